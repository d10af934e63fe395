"""Argument checks shared by every entry point: one rule and one message per concept.

Every check raises ``ValueError`` with a message of the form ``name=value must be ...`` (a tensor is described by
its shape, dtype or range instead of being printed) and returns the value in its working type (float, int, the
tensor). Booleans are rejected wherever a number is expected: ``True`` is not an eps, a count or a seed.

>>> from shadowlab import validate
>>> validate.eps(8 / 255), validate.count(100, "n"), validate.alpha(0.001)
(0.03137254901960784, 100, 0.001)
>>> validate.sigma(0.0)
Traceback (most recent call last):
...
ValueError: sigma=0.0 must be a finite number > 0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = ["number", "eps", "sigma", "alpha", "probability", "positive", "count", "choice", "images", "labels"]


# ----------------------------------------------------------------------------------------------- numbers
def _real(value: Any) -> float | None:
    """value as a float when it is a real number (not a bool; a 0-d tensor counts), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def number(value: Any, name: str, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in the interval given by low / high (open ends with low_open / high_open), as a float.

    The message names the interval: "a finite number >= 0", "a finite number > 0", "a number in [0, 1]",
    "a number in the open interval (0, 1)", "a number in (0, 1]".
    """
    if low is not None and high is not None:
        if low_open and high_open:
            what = f"a number in the open interval ({low:g}, {high:g})"
        else:
            what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        what = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        what = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        what = "a finite number"
    v = _real(value)
    ok = v is not None and math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        raise ValueError(f"{name}={value!r} must be {what}")
    return float(v)


def eps(value: Any, name: str = "eps") -> float:
    """A perturbation budget: a finite number >= 0 (0 means no perturbation)."""
    return number(value, name, low=0.0)


def sigma(value: Any, name: str = "sigma") -> float:
    """A noise level: a finite number > 0."""
    return number(value, name, low=0.0, low_open=True)


def positive(value: Any, name: str) -> float:
    """A finite number > 0 (a learning rate, a scale)."""
    return number(value, name, low=0.0, low_open=True)


def alpha(value: Any, name: str = "alpha") -> float:
    """A failure probability of a certificate or a test: a number in the open interval (0, 1)."""
    return number(value, name, low=0.0, high=1.0, low_open=True, high_open=True)


def probability(value: Any, name: str, low_open: bool = False, high_open: bool = False) -> float:
    """A number in [0, 1] (an end can be made open: beta_frac is in (0, 1])."""
    return number(value, name, low=0.0, high=1.0, low_open=low_open, high_open=high_open)


def count(value: Any, name: str, minimum: int = 1) -> int:
    """An integer >= minimum (1 for sample counts, steps and batch sizes; 0 for seeds), as an int; no bool, no 2.5."""
    is_int = isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not is_int or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def choice(value: Any, name: str, accepted: Iterable[str]) -> str:
    """One of the accepted names."""
    accepted = tuple(accepted)
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is unknown; accepted: {', '.join(accepted)}")
    return value


# ----------------------------------------------------------------------------------------------- tensors
def images(x: Any, name: str = "x", ndim: int | None = 4) -> torch.Tensor:
    """A float batch of images with values in [0, 1] and no NaN, at least one image; returned unchanged.

    ndim=4 (default) asks for N x C x H x W; ndim=None accepts any N x ... with at least 2 dimensions (bound
    propagation also runs on vectors). One host synchronisation when the values are valid.
    """
    layout = "N x C x H x W" if ndim == 4 else "N x ..."
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if (x.dim() != ndim) if ndim is not None else (x.dim() < 2):
        dims = f"{ndim} dimensions" if ndim is not None else "at least 2 dimensions"
        raise ValueError(f"{name} must have shape {layout} ({dims}), got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.numel() == 0:
        raise ValueError(f"{name} must hold at least one image, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor with values in [0, 1], got dtype {x.dtype}")
    if bool((~((x >= 0) & (x <= 1))).any()):      # NaN fails both comparisons
        if bool(torch.isnan(x).any()):
            raise ValueError(f"{name} contains NaN; images must be finite with values in [0, 1]")
        raise ValueError(f"{name} must have values in [0, 1], got range [{float(x.min()):.4g}, {float(x.max()):.4g}]")
    return x


def labels(y: Any, n: int | None = None, name: str = "y", num_classes: int | None = None) -> torch.Tensor:
    """An integer class-index vector of length n (any length when n is None), entries in [0, num_classes) when
    num_classes is given; returned unchanged."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or (n is not None and y.shape[0] != n):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{name} must be an integer tensor of shape ({'N' if n is None else n},), got {shape}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if num_classes is not None and y.numel() and bool(((y < 0) | (y >= num_classes)).any()):
        raise ValueError(f"{name} entries must lie in [0, {num_classes - 1}], got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    return y
