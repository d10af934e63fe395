"""The regularisers of the Shadow Attack's objective (Ghiasi et al. 2020, paper eq. 2), as in the authors' code.

Each takes a perturbation ``delta`` of shape B x C x H x W (as applied to the image: a 1-channel map is repeated on
R, G, B first) and returns one value per image (shape B), differentiable in ``delta``:

- ``total_variation``: smooth TV, the sum of squared horizontal and vertical neighbour differences;
- ``color_penalty``: C, the squared L2 norm of the per-channel mean absolute change;
- ``dissimilarity``: Dissim, how differently the R, G and B channels change (3 channels only);
- ``l2_size``: ||delta||_2, the CROWN-IBP variant's replacement for C.

    >>> d = torch.zeros(1, 3, 2, 2); d[0, :, 0, 0] = 1.0
    >>> total_variation(d), color_penalty(d), dissimilarity(d), l2_size(d)   # doctest: +SKIP
    (tensor([6.]), tensor([0.1875]), tensor([0.]), tensor([1.7321]))
"""

from __future__ import annotations

import torch


def _check_delta(delta: torch.Tensor, name: str = "delta", rgb: bool = False) -> None:
    if not isinstance(delta, torch.Tensor) or delta.dim() != 4:
        shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"{name} must have shape B x C x H x W, got {shape}")
    if rgb and delta.shape[1] != 3:
        raise ValueError(f"{name} must have 3 channels (R, G, B), got shape {tuple(delta.shape)}")


def total_variation(delta: torch.Tensor) -> torch.Tensor:
    """Smooth TV of paper eq. 2 (authors' get_tv): sum of squared horizontal and vertical differences, per image."""
    _check_delta(delta)
    dx = delta[..., :, 1:] - delta[..., :, :-1]
    dy = delta[..., 1:, :] - delta[..., :-1, :]
    return dx.pow(2).flatten(1).sum(1) + dy.pow(2).flatten(1).sum(1)


def color_penalty(delta: torch.Tensor) -> torch.Tensor:
    """Colour term C of paper eq. 2 (authors' get_color): || (mean_pixels |delta_c|)_c ||_2^2, per image."""
    _check_delta(delta)
    return delta.abs().mean(dim=(2, 3)).pow(2).sum(1)


def dissimilarity(delta: torch.Tensor) -> torch.Tensor:
    """Dissim of paper eq. 2 (authors' get_sim): L2 norm over pixels of (dR-dG)^2 + (dG-dB)^2 + (dR-dB)^2."""
    _check_delta(delta, rgb=True)
    r, g, b = delta[:, 0], delta[:, 1], delta[:, 2]
    return ((r - g).pow(2) + (g - b).pow(2) + (r - b).pow(2)).flatten(1).norm(dim=1)


def l2_size(delta: torch.Tensor) -> torch.Tensor:
    """||delta||_2 per image (the CROWN-IBP variant's penalty, authors' t_reg_loss)."""
    _check_delta(delta)
    return delta.flatten(1).norm(dim=1)
