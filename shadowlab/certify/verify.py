"""Verdicts of a certifiably trained network per image (Zhang et al. 2020's tables): certified or not at eps by IBP,
CROWN-IBP or CROWN (``certified``, or auto_LiRPA's with backend="auto_lirpa"), verified error, PGD error, and the
table of all of them (``error_table``). The bounds themselves are ``bounds``'."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from shadowlab import validate
from shadowlab.attacks import pgd
from shadowlab.certify import lirpa
from shadowlab.certify.bounds import METHODS, check_verify_inputs, lower_margins, margin_rows, prepare

BACKENDS = ("shadowlab", "auto_lirpa")  # auto_lirpa: optional, shadowlab/certify/lirpa.py


def _backend(backend: str):
    """The auto_LiRPA adapter for backend="auto_lirpa" (optional, see shadowlab/certify/lirpa.py), None for
    shadowlab's own."""
    validate.choice(backend, "backend", BACKENDS)
    if backend == "shadowlab":
        return None
    return lirpa


def certified(model: nn.Module, x: Tensor, labels: Tensor, eps: float, method: str = "crown-ibp",
              batch_size: int = 256, device: torch.device | str | None = None, backend: str = "shadowlab") -> Tensor:
    """Bool per image: every margin z_label - z_j (j != label) has a lower bound >= 0 on the eps-ball (certificate).

    backend="auto_lirpa" computes the same bounds with auto_LiRPA (``lirpa.certified``; also method "alpha-crown").
    """
    if _backend(backend) is not None:
        return _backend(backend).certified(model, x, labels, eps, method, batch_size, device)
    eps, device, k = check_verify_inputs(model, x, labels, eps, method, batch_size, device, "labels")
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, lab = x[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
            p = prepare(model, xb, eps, margin_rows(lab, k).to(xb.dtype), check=False)
            out.append((lower_margins(p, method) >= 0).all(1))
    return torch.cat(out)


def verified_error(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str = "crown-ibp",
                   batch_size: int = 256, device: torch.device | str | None = None, backend: str = "shadowlab"
                   ) -> float:
    """Fraction of images not certified at eps (some margin lower bound < 0) or misclassified (Zhang et al. 2020).

    backend="auto_lirpa" certifies with auto_LiRPA (``lirpa.certified``), which adds method "alpha-crown".
    """
    lirpa = _backend(backend)
    methods = tuple(lirpa.METHODS) if lirpa is not None else METHODS
    eps, device, _ = check_verify_inputs(model, x, y, eps, method, batch_size, device, methods=methods)
    ok = certified(model, x, y, eps, method, batch_size, device, backend)
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size].to(device)).argmax(1) for i in range(0, len(x), batch_size)])
    return float((~ok | (pred != y.to(device))).float().mean())


def pgd_error(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 20, step_size: float | None = None,
              restarts: int = 1, seed: int = 0, batch_size: int = 256,
              device: torch.device | str | None = None) -> float:
    """Error under an untargeted L-inf PGD attack (Madry et al. 2018) on the eps-ball within [0, 1]: the mean of
    ``pgd_wrong``."""
    return float(pgd_wrong(model, x, y, eps, steps, step_size, restarts, seed, batch_size, device).float().mean())


def pgd_wrong(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 20, step_size: float | None = None,
              restarts: int = 1, seed: int = 0, batch_size: int = 256,
              device: torch.device | str | None = None) -> Tensor:
    """Bool per image (on the CPU): misclassified, or misclassified after an untargeted L-inf PGD attack on the
    eps-ball within [0, 1]. Batch i (of batch_size images) is attacked with seed + i x batch_size."""
    eps, device, _ = check_verify_inputs(model, x, y, eps, "ibp", batch_size, device)
    wrong = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        res = pgd(model, xb, yb, eps, norm="linf", steps=steps, step_size=step_size, restarts=restarts,
                  seed=seed + i)
        with torch.no_grad():
            clean_wrong = model(xb).argmax(1) != yb
        wrong.append((res.success | clean_wrong).cpu())
    return torch.cat(wrong)


def error_table(model: nn.Module, x: Tensor, y: Tensor, eps: float, device: torch.device | str | None = None,
                batch_size: int = 256) -> dict[str, float]:
    """Clean, PGD and verified errors (IBP, CROWN-IBP and the tighter of the two), as in Zhang et al. 2020 tables."""
    eps, device, _ = check_verify_inputs(model, x, y, eps, "ibp", batch_size, device)
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size].to(device)).argmax(1) for i in range(0, len(x), batch_size)])
    correct = pred == y.to(device)
    ok_ibp = certified(model, x, y, eps, "ibp", batch_size, device) & correct
    ok_crown = certified(model, x, y, eps, "crown-ibp", batch_size, device) & correct
    return {
        "clean_error": float((~correct).float().mean()),
        "ibp_verified_error": float((~ok_ibp).float().mean()),
        "crown_ibp_verified_error": float((~ok_crown).float().mean()),
        # tightest sound verdict per image: certified by either method (both bounds are sound)
        "verified_error": float((~(ok_ibp | ok_crown)).float().mean()),
        "pgd_error": pgd_error(model, x, y, eps, batch_size=batch_size, device=device),
    }
