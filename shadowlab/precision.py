"""The arithmetic the base network runs in during the Shadow Attack and CERTIFY: ``--precision fp32|tf32|bf16``.

- ``fp32``: float32 everywhere, TF32 off (the reference);
- ``tf32``: float32 tensors, matrix products and convolutions in TensorFloat-32 on CUDA (10-bit mantissa inputs,
  float32 accumulation); on a CPU the same as fp32;
- ``bf16``: ``torch.autocast`` to bfloat16 on the device (CUDA or CPU), convolution inputs in channels_last.

What it changes: a certificate from CERTIFY is a statement about the smoothed classifier whose base network runs in
the chosen precision, i.e. about a slightly different classifier than the float32 one (votes near a decision
boundary can flip). The Clopper-Pearson bound and the radius are computed in float64 either way. The CROWN-IBP
bounds never use it: they are computed in float32 (lesson 07 shows what lower precision does to a bound).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from shadowlab import validate

PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``PRECISIONS``; ValueError naming the accepted values otherwise."""
    return validate.choice(precision, "precision", PRECISIONS)


@contextmanager
def compute_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the enclosed forward (and backward) passes on ``device`` in ``precision`` (module docstring).

    Restores the TF32 switches on exit. Under bf16 the network's outputs are bfloat16: cast them (``.float()``)
    before a loss or a vote count that needs float32."""
    precision = check_precision(precision)
    dev = torch.device(device)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def prepare_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model made ready for ``precision``: under bf16 a network with convolutions gets its weights in
    channels_last (with channels_last inputs, the layout bf16 convolutions run fastest in on CUDA). In place;
    returns the model."""
    if check_precision(precision) == "bf16" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


__all__ = ["PRECISIONS", "check_precision", "compute_precision", "prepare_model"]
