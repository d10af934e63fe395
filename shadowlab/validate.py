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
import re
import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = ["number", "eps", "sigma", "alpha", "probability", "positive", "count", "choice", "images", "labels",
           "finite", "model_input", "checkpoint_name", "device"]


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


def finite(t: Any, name: str) -> torch.Tensor:
    """A tensor without NaN or infinity (a box corner, a specification); returned unchanged."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be a real tensor, got dtype {t.dtype}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinity; it must be finite")
    return t


# ----------------------------------------------------------------------------------------------- models
# model -> {(C, H, W): its number of outputs}: the probe forward pass runs once per model and input shape
_FITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CIFAR_SHAPE = (3, 32, 32)


def _expected_channels(model: torch.nn.Module) -> int | None:
    """The colour channels the model's first layer takes: a Normalize's mean or the first Conv2d's in_channels."""
    for m in model.modules():
        mean = getattr(m, "mean", None)
        if type(m).__name__ == "Normalize" and isinstance(mean, torch.Tensor) and mean.dim() == 4:
            return int(mean.shape[1])
        if isinstance(m, torch.nn.Conv2d):
            return int(m.in_channels)
    return None


def model_input(model: Any, x: Any, name: str = "x") -> int:
    """A batch of images (``images``: N x C x H x W in [0, 1]) that ``model`` takes, with the channels its first
    layer needs (3 for every shadowlab model: a 1-channel image is refused, not broadcast) and a height and width its
    layers fit (28 x 28 on a 32 x 32 model is refused). Returns the model's number of outputs (the classes).

    The height and width are checked by one forward pass of a zero image in eval mode without gradients (the
    model's training flags are restored), once per model and input shape.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    images(x, name)
    shape = tuple(int(s) for s in x.shape[1:])
    channels = _expected_channels(model)
    if channels is not None and shape[0] != channels:
        raise ValueError(f"{name} must have shape N x {channels} x H x W ({channels} colour channels), got shape "
                         f"{tuple(x.shape)}")
    known = _FITS.get(model, {})
    if shape in known:
        return known[shape]
    param = next(iter(model.parameters()), None)
    dev = param.device if param is not None else x.device
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            try:
                out = model(torch.zeros((1, *shape), device=dev))
            except RuntimeError as err:
                hint = ""
                if shape != CIFAR_SHAPE:
                    try:
                        model(torch.zeros((1, *CIFAR_SHAPE), device=dev))
                        hint = f"; this model takes N x {' x '.join(map(str, CIFAR_SHAPE))}"
                    except RuntimeError:
                        pass
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ValueError(f"{name} of shape {tuple(x.shape)} does not fit the model{hint} ({first})") from None
    finally:
        for m, mode in modes:
            m.training = mode
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model must map {name} to N x K logits, got {got}")
    _FITS.setdefault(model, {})[shape] = int(out.shape[1])
    return int(out.shape[1])


# ----------------------------------------------------------------------------------------------- names, devices
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def checkpoint_name(value: Any, name: str = "name") -> str:
    """A checkpoint name: letters, digits, '.', '_' and '-', starting with a letter or digit, no path separator and
    no '..' (so that ``<models folder>/<name>.safetensors`` stays inside the folder), at most 128 characters."""
    if not isinstance(value, str) or len(value) > 128 or not _NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{name}={value!r} must be a checkpoint name of letters, digits, '.', '_' and '-' (starting "
                         "with a letter or digit, no '/' or '..', at most 128 characters)")
    return value


def device(value: Any, name: str = "device") -> torch.device:
    """A torch device this machine has: 'cpu', 'cuda' or 'cuda:K' (K < the GPU count) or 'mps' where available.
    Refuses an unknown name and a CUDA device without a GPU, saying so."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a device; accepted: cpu, cuda, cuda:K") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={value!r}: no CUDA GPU is available here (torch.cuda.is_available() is "
                             "False); use cpu or leave the device out")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={value!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered 0 to {torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{name}={value!r}: MPS is not available here; use cpu")
    elif dev.type != "cpu":
        raise ValueError(f"{name}={value!r} is not supported; accepted: cpu, cuda, cuda:K")
    return dev
