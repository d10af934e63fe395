"""Re-judge a committed table from its files alone: the 8-bit shadow images, the per-image CSV and the JSON settings.

For every CSV row the shadow image is read from ``<name>_shadows.npz`` and compared with the natural test image it
was made from: SSIM is recomputed (perception.ssim) and the wrong label is certified again by a *separate*
judgement, a CERTIFY with a seed the table never used (smoothing) or the sound bounds at the model's eps (CROWN-IBP).
Success is then recomputed with perception.shadow_success. The report says how often the two judgements agree,
and ``ssim_figure`` draws SSIM against L2 for the shadows, PGD examples and random noise on the same images.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from shadowlab import checkpoints
from shadowlab.attacks import pgd
from shadowlab.certify import lirpa
from shadowlab.certify.bounds import certified_margins, margin_spec
from shadowlab.certify.smoothing import Smooth
from shadowlab.certify.verify import certified
from shadowlab.data import load_cifar10
from shadowlab.experiments.controls import smooth_noise, white_noise
from shadowlab.models import NUM_CLASSES, default_device
from shadowlab.perception import quantize, shadow_success, ssim
from shadowlab.plots import plot_ssim_vs_l2

REJUDGE_SEED = 987_654   # a certification seed no table uses


def load_table(table_dir: str | Path) -> tuple[str, dict[str, Any], list[dict[str, str]], np.ndarray]:
    """(name, JSON record, CSV rows, uint8 shadows N x 3 x H x W) of a table written by table_report.write_outputs."""
    table_dir = Path(table_dir)
    jsons = sorted(p for p in table_dir.glob("table*.json") if p.stem in ("table1", "table2"))
    if not jsons:
        raise ValueError(f"table_dir={str(table_dir)!r} holds no table1.json or table2.json")
    name = jsons[0].stem
    record = json.loads(jsons[0].read_text())
    with open(table_dir / f"{name}_per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    shadows = np.load(table_dir / f"{name}_shadows.npz")["x_shadow"]
    if len(shadows) != len(rows):
        raise ValueError(f"{name}_shadows.npz has {len(shadows)} images but the CSV has {len(rows)} rows")
    return name, record, rows, shadows


def _natural(record: dict[str, Any], rows: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(int(r["index"]) for r in rows) + 1
    x, y, _ = load_cifar10("test", n=n, source=record["settings"]["data"])
    return x, y


def rejudge(table_dir: str | Path, n: int | None = None, n0: int = 100, alpha: float | None = None,
            seed: int = REJUDGE_SEED, device: str | torch.device | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Re-judge every row of a committed Table 1 or Table 2 (see the module docstring); returns the agreement
    figures and each row's new verdict ("rejudged_spoofed", in the order of the table's per-image rows) and writes
    them to ``rejudge.json`` beside the table. For Table 1 the separate CERTIFY uses the table's
    n and alpha unless given."""
    name, record, rows, shadows = load_table(table_dir)
    settings = record["settings"]
    min_ssim = float(settings["min_ssim"])
    dev = torch.device(device) if device else default_device()
    x_nat, y_nat = _natural(record, rows)
    groups: dict[tuple, list[int]] = {}
    for k, r in enumerate(rows):
        key = (float(r["sigma"]), int(r["channels"])) if name == "table1" else (r["model"],)
        groups.setdefault(key, []).append(k)
    table1_models = {float(r["sigma"]): r["model"] for r in record.get("rows", []) if name == "table1"}
    new_ssim = np.zeros(len(rows))
    new_spoofed = np.zeros(len(rows), dtype=bool)
    for key, ks in tqdm(groups.items(), desc=f"re-judging {name}", disable=not progress):
        idx = torch.tensor([int(rows[k]["index"]) for k in ks])
        x = x_nat[idx].to(dev)
        xs = torch.from_numpy(shadows[ks]).float().div(255).to(dev)
        target = torch.tensor([int(rows[k]["target"]) for k in ks], device=dev)
        new_ssim[ks] = ssim(x, xs).cpu().numpy()
        if name == "table1":
            sigma = key[0]
            model, _ = checkpoints.load(table1_models.get(sigma, f"smooth-sigma{sigma:.2f}"), device=dev)
            certs = Smooth(model, NUM_CLASSES, sigma, device=dev).certify(
                xs, n0, n or int(settings["n"]), alpha or float(settings["alpha"]), seed=seed)
            new_spoofed[ks] = [c.prediction == int(t) for c, t in zip(certs, target.tolist())]
        else:
            model, meta = checkpoints.load(key[0], device=dev)
            eps = float(meta["defense_parameter"]["eps"])
            y = y_nat[idx].to(dev)
            margins = certified_margins(model, xs, eps, margin_spec(y, NUM_CLASSES, target=target)).amin(1)
            new_spoofed[ks] = (margins >= 0).cpu().numpy()
    old_ssim = np.array([float(r["ssim"]) for r in rows])
    old_spoofed = np.array([r["spoofed"] == "True" for r in rows])
    old_success = np.array([r["success"] == "True" for r in rows])
    new_success = shadow_success(torch.from_numpy(new_spoofed), torch.from_numpy(new_ssim), min_ssim).numpy()
    per_group = {}
    for key, ks in groups.items():
        label = f"sigma {key[0]:.2f}, {key[1]}-channel" if name == "table1" else key[0]
        per_group[label] = {"committed_success": float(old_success[ks].mean()),
                            "rejudged_success": float(new_success[ks].mean()),
                            "committed_spoof": float(old_spoofed[ks].mean()),
                            "rejudged_spoof": float(new_spoofed[ks].mean())}
    report = {
        "table": name, "rows": len(rows), "min_ssim": min_ssim, "seed": seed,
        "certify": {"n0": n0, "n": n or settings.get("n"), "alpha": alpha or settings.get("alpha")}
        if name == "table1" else "bounds (deterministic)",
        "max_abs_ssim_difference": float(np.abs(new_ssim - old_ssim).max()),
        "success_rows_below_min_ssim": int((old_success & (new_ssim < min_ssim)).sum()),
        "spoofed_agreement": float((new_spoofed == old_spoofed).mean()),
        "success_agreement": float((new_success == old_success).mean()),
        "committed_success_rate": float(old_success.mean()), "rejudged_success_rate": float(new_success.mean()),
        "per_group": per_group,
        "rejudged_spoofed": new_spoofed.tolist(),   # per row of the table's per_image, in its order
    }
    (Path(table_dir) / "rejudge.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def perceptual_reference(x: torch.Tensor, y: torch.Tensor, l2_sizes: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0),
                         model: str = "cnn-undefended", pgd_steps: int = 10, seed: int = 0,
                         device: str | torch.device | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(L2 sizes, SSIMs) of reference perturbations of the images x (labels y) at each L2 size: untargeted L2 PGD
    against ``model``, white Gaussian noise, and random smooth grey noise (controls.smooth_noise); for the
    SSIM-against-L2 figure of the l_p critique (an L2 ball says little about what a person sees)."""
    device = torch.device(device) if device else default_device()
    net, _ = checkpoints.load(model, device=device)
    x, y = x.to(device), y.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    kinds: dict[str, tuple[list, list]] = {"PGD (L2, undefended model)": ([], []), "white noise": ([], []),
                                          "smooth noise": ([], [])}
    for size in l2_sizes:
        sizes = torch.full((len(x),), float(size), device=device)
        perturbed = {"PGD (L2, undefended model)": quantize(pgd(net, x, y, size, norm="l2", steps=pgd_steps,
                                                                 seed=seed).x_adv),
                     "white noise": white_noise(x, sizes, generator=gen),
                     "smooth noise": smooth_noise(x, sizes, seed)}
        for kind, xp in perturbed.items():
            kinds[kind][0].extend((xp - x).flatten(1).norm(dim=1).tolist())
            kinds[kind][1].extend(ssim(x, xp).tolist())
    return {k: (np.array(a), np.array(b)) for k, (a, b) in kinds.items()}

def ssim_figure(table_dir: str | Path, out: str | Path | None = None, device: str | torch.device | None = None):
    """SSIM against L2 for a committed table's shadow images, beside untargeted L2 PGD examples, white noise and
    random smooth noise of several sizes on the same natural images (perceptual_reference); saved to
    ``<name>_ssim_vs_l2.png`` (or ``out``). Returns the figure."""
    import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

    name, record, rows, _ = load_table(table_dir)
    x_nat, y_nat = _natural(record, rows)
    points: dict[str, tuple[list, list]] = {}
    for r in rows:
        label = (f"shadow, {r['channels']}-channel" if name == "table1" else "shadow (CROWN-IBP)")
        p = points.setdefault(label, ([], []))
        p[0].append(float(r["l2"]))
        p[1].append(float(r["ssim"]))
    ref = perceptual_reference(x_nat, y_nat, device=device)
    fig = plot_ssim_vs_l2({**{k: (np.array(a), np.array(b)) for k, (a, b) in points.items()}, **ref},
                          float(record["settings"]["min_ssim"]))
    fig.axes[0].set_title(f"{name}: what an L2 size says about what a person sees", fontsize=10)
    path = Path(out) if out else Path(table_dir) / f"{name}_ssim_vs_l2.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return fig


__all__ = ["REJUDGE_SEED", "load_table", "rejudge", "ssim_figure"]


def certify_shadows(table_dir: str | Path, per_model: int = 20, methods: Sequence[str] = ("ibp", "crown-ibp",
                    "crown", "alpha-crown"), models: Sequence[str] | None = None,
                    bound_opts: dict[str, Any] | None = None, device: torch.device | str | None = None
                    ) -> list[dict[str, Any]]:
    """How many of a Table 2 run's shadow images each verifier certifies for the attack's target, per model.

    Reads ``table2_per_image.csv`` and ``table2_shadows.npz`` (x_shadow uint8 N x 3 x H x W, one per CSV row) of
    ``table_dir``, takes the first ``per_model`` rows of each model (all models, or ``models``) and certifies every
    margin z_target - z_j (j != target) of the shadow image at the model's eps: ibp, crown-ibp and crown by
    shadowlab, alpha-crown by auto_LiRPA one image at a time (on batches of 4 cnn-2layer images its dense slopes
    outgrew 24 GB of memory). Returns one dict per model: images, then per method the count certified, and "any"
    (certified by at least one method). Example: ``certify_shadows("data/results/table2", 20)``.
    """
    table_dir = Path(table_dir)
    csv_path, npz_path = table_dir / "table2_per_image.csv", table_dir / "table2_shadows.npz"
    for p in (csv_path, npz_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: run `python -m shadowlab reproduce table2` first")
    rows = list(csv.DictReader(open(csv_path)))
    shadows = np.load(npz_path, allow_pickle=False)["x_shadow"]
    if len(shadows) != len(rows):
        raise ValueError(f"{npz_path} holds {len(shadows)} shadow images for {len(rows)} rows of {csv_path}")
    names = list(dict.fromkeys(r["model"] for r in rows)) if models is None else list(models)
    out = []
    for name in names:
        ks = [k for k, r in enumerate(rows) if r["model"] == name][:per_model]
        if not ks:
            raise ValueError(f"model {name!r} has no rows in {csv_path}")
        model, meta = checkpoints.load(name)
        eps = float(meta["defense_parameter"]["eps"])
        x = torch.as_tensor(shadows[ks]).float() / 255
        target = torch.tensor([int(rows[k]["target"]) for k in ks])
        res: dict[str, Any] = {"model": name, "eps_255": round(eps * 255, 3), "images": len(ks)}
        verdicts = []
        for m in methods:
            if m != "alpha-crown":
                ok = certified(model, x, target, eps, m, device=device).cpu()
            else:  # one image at a time: dense alpha-CROWN holds slopes per neuron and specification (GBs per image)
                ok = lirpa.certified(model, x, target, eps, m, batch_size=1, device=device,
                                     bound_opts=bound_opts).cpu()
            res[m] = int(ok.sum())
            verdicts.append(ok)
        res["any"] = int(torch.stack(verdicts).any(0).sum())
        out.append(res)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shadowlab.experiments.rejudge [TABLE_DIR] [--per-model K]``: the certify_shadows table as JSON
    lines."""
    p = argparse.ArgumentParser(prog="python -m shadowlab.experiments.rejudge", description=certify_shadows.__doc__)
    p.add_argument("table_dir", nargs="?", default="data/results/table2")
    p.add_argument("--per-model", type=int, default=20)
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=["ibp", "crown-ibp", "crown", "alpha-crown"],
                   choices=["ibp", "crown-ibp", "crown", "alpha-crown"])
    args = p.parse_args(argv)
    for row in certify_shadows(args.table_dir, args.per_model, args.methods, args.models):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
