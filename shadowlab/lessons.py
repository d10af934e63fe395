"""Small computations the lessons state as facts, so that every number in their prose is computed, not typed.

Each function is a one-screen consequence of the project's own code: the CERTIFY radius cap from
``smoothing.lower_confidence_bound``, the disjoint-balls condition of two smoothing certificates, how concentrated
a perturbation's energy is, the first test image of each class whatever the data source's order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import norm

from .smoothing import lower_confidence_bound


def radius_cap(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with n estimation samples: sigma * Phi^-1(pA_lower(n_A = n)).

    With every vote for c_A the Clopper-Pearson bound is alpha^(1/n) (one-sided, level 1 - alpha), so the cap is
    sigma * Phi^-1(alpha^(1/n)): 1.93 sigma at n = 256, 3.81 sigma at n = 100,000 (alpha = 0.001).
    sigma must be > 0, n an integer >= 1, alpha in (0, 1).
    """
    if not isinstance(sigma, (int, float, np.floating)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma={sigma!r} must be a finite number > 0")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1")
    p = float(lower_confidence_bound(int(n), int(n), alpha))
    return float(sigma) * float(norm.ppf(p)) if p > 0.5 else 0.0


def disjoint_balls(x: torch.Tensor, x_shadow: torch.Tensor, r_natural: torch.Tensor,
                   r_spoofed: torch.Tensor) -> torch.Tensor:
    """Bool per image: ||x_shadow - x||_2 >= r_natural + r_spoofed.

    The certificate of x (label y, radius r_natural) and that of x_shadow (label t != y, radius r_spoofed) can both
    hold only if their L2 balls do not overlap, i.e. exactly when this is True; each certificate holds with
    probability >= 1 - alpha, so when it is False at least one of them is wrong (with probability <= 2 alpha
    this happens by chance). x, x_shadow: B x C x H x W; radii: B.
    """
    if x.shape != x_shadow.shape or x.dim() != 4:
        raise ValueError(f"x and x_shadow must have the same shape B x C x H x W, got {tuple(x.shape)} and "
                         f"{tuple(x_shadow.shape)}")
    r_natural, r_spoofed = torch.as_tensor(r_natural).float().cpu(), torch.as_tensor(r_spoofed).float().cpu()
    if r_natural.shape != (x.shape[0],) or r_spoofed.shape != (x.shape[0],):
        raise ValueError(f"r_natural and r_spoofed must have shape ({x.shape[0]},), got {tuple(r_natural.shape)} "
                         f"and {tuple(r_spoofed.shape)}")
    dist = (x_shadow - x).flatten(1).norm(dim=1).float().cpu()
    return dist >= r_natural + r_spoofed


def energy_share(delta: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """Per image, the share of ||delta||_2^2 held by its largest ``fraction`` of coordinates (by |delta_i|).

    A perturbation spread evenly over all d coordinates gives about ``fraction``; one concentrated on a few pixels
    gives close to 1 (the L1 ball's corners are the sparse ones; L-inf spreads, L2 lies in between).
    delta: B x ...; fraction in (0, 1]. Returns a float tensor of shape B (0 for an all-zero delta).
    """
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be a number in (0, 1]")
    sq = delta.detach().flatten(1).float().pow(2)
    k = max(1, int(round(fraction * sq.shape[1])))
    top = sq.topk(k, dim=1).values.sum(1)
    total = sq.sum(1)
    return torch.where(total > 0, top / total.clamp_min(1e-30), torch.zeros_like(total))


def first_image_per_class(num_classes: int = 10, source: str = "auto", device: str | torch.device | None = None,
                          search: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first test image of each class in the source's order (the paper's ablation images), by class.

    Returns images (num_classes x 3 x 32 x 32), labels (0 .. num_classes - 1) and their test-set indices. Looks at
    the first ``search`` test images (the committed subset interleaves classes, so its first 10 are these; the
    official test set does not, but holds every class within its first 100).
    """
    from .data import load_cifar10

    x, y, _ = load_cifar10("test", n=search, source=source)
    idx = []
    for c in range(num_classes):
        hits = (y == c).nonzero()
        if len(hits) == 0:
            raise ValueError(f"class {c} is not among the first search={search} test images; raise search")
        idx.append(int(hits[0]))
    index = torch.tensor(idx)
    dev = torch.device(device) if device is not None else x.device
    return x[index].to(dev), y[index].to(dev), index


__all__ = ["disjoint_balls", "energy_share", "first_image_per_class", "radius_cap"]
