"""What a person sees: SSIM between a natural and a perturbed image, and the one definition of a shadow success.

The paper's shadow image has three properties (Ghiasi et al. 2020, sec. 1): it looks like the natural image, it
gets a wrong label, and that label gets a strong certificate. The certificate code decides the last two; this
module decides the first, with the structural similarity index of Wang, Bovik, Sheikh and Simoncelli (IEEE TIP
2004): Gaussian window 11 x 11 with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, the mean of the SSIM map over
the *valid* window positions (22 x 22 on a 32 x 32 image), averaged over R, G, B. It is computed by pytorch-msssim,
which follows that convention (scikit-image with ``gaussian_weights=True, use_sample_covariance=False`` agrees to
float precision; torchmetrics pads the border and reads lower on 32 x 32 images).

``shadow_success`` is the single place where "the attack succeeded" is defined; every table, claim, figure,
widget and the benchmark call it.
"""

from __future__ import annotations

import math

import torch
from pytorch_msssim import ssim as _msssim_ssim

from shadowlab.regularisers import total_variation

MIN_SSIM = 0.9          # default threshold: a shadow image with SSIM below this is not counted as a success
WINDOW, WINDOW_SIGMA, K = 11, 1.5, (0.01, 0.03)


def check_min_ssim(min_ssim: float, name: str = "min_ssim") -> float:
    """``min_ssim`` as a float, or a ValueError naming it: it must be a number in (0, 1] (not NaN, not a bool)."""
    if isinstance(min_ssim, bool) or not isinstance(min_ssim, (int, float)) or not math.isfinite(min_ssim) \
            or not 0.0 < min_ssim <= 1.0:
        raise ValueError(f"{name}={min_ssim!r} must be a number in (0, 1] (SSIM threshold of an imperceptible image)")
    return float(min_ssim)


def _check_pair(x: torch.Tensor, x_other: torch.Tensor) -> None:
    for name, v in (("x", x), ("x_other", x_other)):
        if not isinstance(v, torch.Tensor) or v.dim() != 4 or not v.is_floating_point():
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{name} must be a float tensor B x C x H x W with values in [0, 1], got {shape}")
    if x.shape != x_other.shape:
        raise ValueError(f"x and x_other must have the same shape, got {tuple(x.shape)} and {tuple(x_other.shape)}")
    if min(x.shape[-2:]) < WINDOW:
        raise ValueError(f"images must be at least {WINDOW} x {WINDOW} pixels for SSIM, got {tuple(x.shape[-2:])}")


def ssim(x: torch.Tensor, x_other: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM(x, x_other) of Wang et al. 2004 (window 11, sigma 1.5, K1 0.01, K2 0.03, valid window, mean
    over channels), on the tensors' device in one batch.

    x, x_other: B x C x H x W in [0, 1] (H, W >= 11). Returns a float tensor of shape B; 1 for identical images,
    below 1 otherwise (it can be negative for anti-correlated images). Example: ``ssim(x, x_shadow) >= 0.9``.
    """
    _check_pair(x, x_other)
    with torch.no_grad():
        return _msssim_ssim(x.float(), x_other.float(), data_range=1.0, size_average=False, win_size=WINDOW,
                            win_sigma=WINDOW_SIGMA, K=K)


def tv_per_pixel(x: torch.Tensor, x_other: torch.Tensor) -> torch.Tensor:
    """The perturbation's smooth total variation (paper eq. 2's TV of delta = x_other - x) divided by the number of
    values C x H x W: shape B. 0 for a constant shift; about 4 var(delta) for white noise."""
    _check_pair(x, x_other)
    delta = (x_other - x).float()
    return total_variation(delta) / delta[0].numel()


def quantize(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit image a person (and a re-judge) gets: round(255 x) / 255 of values clamped to [0, 1]."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def imperceptible(ssim_values: torch.Tensor, min_ssim: float = MIN_SSIM) -> torch.Tensor:
    """Bool tensor: SSIM(x, x') >= min_ssim, i.e. a person still sees the natural image."""
    return ssim_values >= check_min_ssim(min_ssim)


def shadow_success(spoofed: torch.Tensor, ssim_values: torch.Tensor, min_ssim: float = MIN_SSIM) -> torch.Tensor:
    """The Shadow Attack's success (all three properties of the paper): the wrong label is certified (``spoofed``,
    bool B) AND the shadow image is imperceptible (SSIM >= min_ssim). Shape B, bool."""
    if spoofed.shape != ssim_values.shape:
        raise ValueError(f"spoofed and ssim_values must have the same shape, got {tuple(spoofed.shape)} and "
                         f"{tuple(ssim_values.shape)}")
    return spoofed.bool() & imperceptible(ssim_values, min_ssim)


__all__ = ["MIN_SSIM", "check_min_ssim", "imperceptible", "quantize", "shadow_success", "ssim", "tv_per_pixel"]
