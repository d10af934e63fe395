"""The model-zoo table: clean accuracy and accuracy under Gaussian noise of every committed model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from shadowlab import checkpoints, validate
from shadowlab.attacks import fgsm, pgd
from shadowlab.certify.smoothing import Smooth, summarize
from shadowlab.certify.verify import error_table
from shadowlab.data import load_cifar10, resolve_source
from shadowlab.defenses.train import accuracy
from shadowlab.models import NUM_CLASSES, default_device
from shadowlab.tables import Format, markdown_table

# Issue targets for the zoo (accuracy under one draw of N(0, sigma^2) noise; clean accuracy when undefended).
ATTACKS = ("fgsm", "pgd")   # accuracy_vs_eps
TARGETS = {"cnn-undefended": 0.85, "smooth-sigma0.12": 0.80, "smooth-sigma0.25": 0.75,
           "smooth-sigma0.50": 0.62, "smooth-sigma1.00": 0.45}


@dataclass
class ZooRow:
    """One line of the zoo table."""

    model: str
    arch: str
    defense: str
    sigma: float
    parameters: int
    clean_accuracy: float
    noisy_accuracy: float | None
    target: float | None
    meets_target: bool | None

    def to_dict(self) -> dict:
        return asdict(self)


def zoo_rows(names: list[str], x: torch.Tensor, y: torch.Tensor, device: torch.device | str | None = None,
             seed: int = 0) -> list[ZooRow]:
    """Evaluate each named checkpoint on (x, y)."""
    rows = []
    for name in names:
        model, meta = checkpoints.load(name, device=device)
        sigma = float(meta.get("defense_parameter", {}).get("sigma", 0.0))
        clean = accuracy(model, x, y, device=device)
        noisy = accuracy(model, x, y, sigma=sigma, seed=seed, device=device) if sigma > 0 else None
        target = TARGETS.get(name)
        headline = noisy if noisy is not None else clean
        rows.append(ZooRow(name, meta["arch"], meta.get("defense", "none"), sigma,
                           sum(p.numel() for p in model.parameters()), clean, noisy, target,
                           None if target is None else headline >= target))
    return rows


ZOO_COLUMNS: list[tuple[str, str, Format]] = [
    ("model", "model", "str"), ("defense", "defense", "str"), ("sigma", "sigma", "2"),
    ("params", "parameters", lambda p: f"{p / 1e6:.2f}M"), ("clean acc.", "clean_accuracy", "pct"),
    ("acc. under N(0, sigma^2)", "noisy_accuracy", "pct"), ("target", "target", lambda t: f">= {100 * t:.0f}%"),
    ("met", "meets_target", lambda met: "yes" if met else "NO")]


def markdown(rows: list[ZooRow], caption: str = "") -> str:
    """The zoo table in Markdown (``ZOO_COLUMNS``; "-" where a model has no noise, target or verdict), after
    ``caption`` and a blank line when one is given."""
    return (caption + "\n\n" if caption else "") + markdown_table(ZOO_COLUMNS, [r.to_dict() for r in rows])


def smoothing_rows(names: list[str], x: torch.Tensor, y: torch.Tensor, n: int = 1000, n0: int = 100,
                   alpha: float = 0.001, seed: int = 0, device: torch.device | str | None = None,
                   progress: bool = True) -> list[dict]:
    """Approximate certified accuracy (Cohen et al. CERTIFY) of each smoothing model on (x, y)."""
    rows = []
    for name in names:
        model, meta = checkpoints.load(name, device=device)
        sigma = float(meta["defense_parameter"]["sigma"])
        smooth = Smooth(model, NUM_CLASSES, sigma, device=device)
        records = []
        for i in tqdm(range(0, len(x), 10), desc=f"certify {name}", disable=not progress):
            records += smooth.certify(x[i:i + 10], n0=n0, n=n, alpha=alpha, seed=seed + i)
        rows.append({"model": name, "sigma": sigma, "n": n, "n0": n0, "alpha": alpha, "n_images": len(x),
                     **summarize(records, y)})
    return rows


def crown_ibp_rows(names: list[str], x: torch.Tensor, y: torch.Tensor,
                   device: torch.device | str | None = None) -> list[dict]:
    """Clean, PGD and verified errors (IBP, CROWN-IBP) of each CROWN-IBP model at its training eps."""
    rows = []
    for name in tqdm(names, desc="CROWN-IBP models"):
        model, meta = checkpoints.load(name, device=device)
        eps = float(meta["defense_parameter"]["eps"])
        rows.append({"model": name, "arch": meta["arch"], "eps": eps, "n_images": len(x),
                     **error_table(model, x, y, eps, device=device)})
    return rows


RADII = ("0", "0.25", "0.5", "0.75", "1")   # the radii of smoothing_markdown's certified-accuracy columns


def smoothing_markdown(rows: list[dict]) -> str:
    """The Markdown table of ``smoothing_rows``: certified accuracy at each radius of ``RADII`` and the mean radius
    of the correctly certified images ("-" when there is none)."""
    cols: list[tuple[str, str, Format]] = [
        ("model", "model", "str"), ("sigma", "sigma", "2"), ("n", "n", "str"),
        *((f"cert. acc. r={k}", f"r={k}", "pct") for k in RADII),
        ("mean radius (correct)", "mean_radius_correct", "3")]
    return markdown_table(cols, [{**r, **{f"r={k}": r["certified_accuracy"][k] for k in RADII}} for r in rows])


CROWN_IBP_COLUMNS: list[tuple[str, str, Format]] = [
    ("model", "model", "str"), ("eps", "eps", lambda eps: f"{round(eps * 255)}/255"),
    ("clean err.", "clean_error", "pct"), ("PGD err.", "pgd_error", "pct"),
    ("IBP verified err.", "ibp_verified_error", "pct"), ("CROWN-IBP verified err.", "crown_ibp_verified_error", "pct"),
    ("verified err.", "verified_error", "pct")]


def crown_ibp_markdown(rows: list[dict]) -> str:
    """The Markdown table of ``crown_ibp_rows`` (``CROWN_IBP_COLUMNS``: eps in 255ths, the errors in percent)."""
    return markdown_table(CROWN_IBP_COLUMNS, rows)


def zoo_table(n: int | None = None, source: str = "auto", jpeg: str | None = None, download: bool = False,
              device: str | torch.device | None = None, out: Path | None = None, seed: int = 0,
              certify_images: int = 20, certify_n: int = 1000, verify_images: int = 1000) -> list[ZooRow]:
    """Evaluate every committed model (accuracy, smoothing certificates, CROWN-IBP errors); print and write JSON."""
    device = torch.device(device) if device else default_device()
    names = [m for m in checkpoints.available() if m in TARGETS or m.startswith("smooth-")]
    x, y, _ = load_cifar10("test", n=n, source=source, jpeg=jpeg, download=download)
    used = resolve_source("test", source, jpeg=jpeg)
    rows = zoo_rows(names, x, y, device=device, seed=seed)
    caption = (f"Model zoo on {len(x)} CIFAR-10 test images (source: {used}"
               + (", a JPEG re-encoding" if used in ("jpeg", "subset") else "") + f"; noise seed {seed})")
    print(markdown(rows, caption))
    smooth_names = [m for m in names if m.startswith("smooth-")]
    smooth = []
    if smooth_names and certify_images > 0:
        k = min(certify_images, len(x))
        smooth = smoothing_rows(smooth_names, x[:k], y[:k], n=certify_n, seed=seed, device=device)
        print(f"\nRandomized smoothing, approximate certified accuracy on the first {k} of these images "
              f"(CERTIFY n0 = 100, n = {certify_n}, alpha = 0.001)\n")
        print(smoothing_markdown(smooth))
    crown_names = [m for m in checkpoints.available() if m.startswith("crownibp-")]
    crown = []
    if crown_names and verify_images > 0:
        k = min(verify_images, len(x))
        crown = crown_ibp_rows(crown_names, x[:k], y[:k], device=device)
        print(f"\nCROWN-IBP models on the first {k} of these images (L-inf ball at the training eps)\n")
        print(crown_ibp_markdown(crown))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"source": used, "n_images": len(x), "seed": seed,
                                   "rows": [r.to_dict() for r in rows], "smoothing": smooth,
                                   "crown_ibp": crown}, indent=2) + "\n")
        print(f"\nwritten: {out}")
    return rows


def accuracy_vs_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: Sequence[float],
                    attack: str = "fgsm", device: str | torch.device | None = None, **pgd_kwargs: Any) -> np.ndarray:
    """Accuracy of ``model`` on (x, y) under FGSM or PGD at every eps (eps = 0: clean accuracy); one value per eps.

    attack is one of ATTACKS ("fgsm", "pgd"; pgd_kwargs go to attacks.pgd); returns a float array of len(eps_list).
    """
    validate.choice(attack, "attack", ATTACKS)
    dev = torch.device(device) if device is not None else default_device()
    model = model.to(dev).eval()
    x, y = x.to(dev), y.to(dev)
    accs = []
    for eps in eps_list:
        if eps == 0:
            x_adv = x
        elif attack == "fgsm":
            x_adv = fgsm(model, x, y, float(eps)).x_adv
        else:
            x_adv = pgd(model, x, y, float(eps), **pgd_kwargs).x_adv
        with torch.no_grad():
            accs.append((model(x_adv).argmax(1) == y).float().mean())
    return torch.stack(accs).cpu().numpy()
