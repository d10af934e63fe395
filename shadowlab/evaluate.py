"""The model-zoo table: clean accuracy and accuracy under Gaussian noise of every committed model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import checkpoints
from .data import load_cifar10, resolve_source
from .models import default_device
from .train import accuracy

# Issue targets for the zoo (accuracy under one draw of N(0, sigma^2) noise; clean accuracy when undefended).
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


def markdown(rows: list[ZooRow], caption: str = "") -> str:
    lines = ["| model | defense | sigma | params | clean acc. | acc. under N(0, sigma^2) | target | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        noisy = f"{100 * r.noisy_accuracy:.1f}%" if r.noisy_accuracy is not None else "-"
        target = f">= {100 * r.target:.0f}%" if r.target is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[r.meets_target]
        lines.append(f"| {r.model} | {r.defense} | {r.sigma:.2f} | {r.parameters / 1e6:.2f}M | "
                     f"{100 * r.clean_accuracy:.1f}% | {noisy} | {target} | {met} |")
    return (caption + "\n\n" if caption else "") + "\n".join(lines)


def zoo_table(n: int | None = None, source: str = "auto", jpeg: str | None = None,
              device: str | torch.device | None = None, out: Path | None = None, seed: int = 0) -> list[ZooRow]:
    """Evaluate every committed undefended and Gaussian-noise model, print Markdown, write JSON."""
    device = torch.device(device) if device else default_device()
    names = [m for m in checkpoints.available() if m in TARGETS or m.startswith("smooth-")]
    x, y, _ = load_cifar10("test", n=n, source=source, jpeg=jpeg)
    used = resolve_source("test", source, jpeg=jpeg)
    rows = zoo_rows(names, x, y, device=device, seed=seed)
    caption = (f"Model zoo on {len(x)} CIFAR-10 test images (source: {used}"
               + (", a JPEG re-encoding" if used in ("jpeg", "subset") else "") + f"; noise seed {seed})")
    print(markdown(rows, caption))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"source": used, "n_images": len(x), "seed": seed,
                                   "rows": [r.to_dict() for r in rows]}, indent=2) + "\n")
        print(f"\nwritten: {out}")
    return rows
