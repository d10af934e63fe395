"""The paper's Tables 1 and 2 at CPU size: natural certificates against spoofed ones (Ghiasi et al. 2020)."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoints
from .data import CLASSES, load_cifar10, resolve_source
from .models import NUM_CLASSES, default_device
from .shadow import ShadowConfig, attack_crown_ibp, attack_smoothing
from .smoothing import Smooth, summarize

SIGMAS = (0.12, 0.25, 0.50, 1.00)
RADIUS_RATIO_CLAIM = 0.7  # spoofed mean radius >= 0.7 x natural mean radius for every sigma


@dataclass
class TableResult:
    """Rows of a reproduced table, per-image records, the claims checked, and where files were written."""

    name: str
    rows: list[dict[str, Any]]
    per_image: list[dict[str, Any]]
    claims: dict[str, Any]
    settings: dict[str, Any]
    markdown: str = ""
    files: dict[str, str] = field(default_factory=dict)
    examples: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings, "rows": self.rows, "claims": self.claims,
                "per_image": self.per_image, "files": self.files}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _fmt(v: float | None, pct: bool = False, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def smoothing_config(channels: int, steps: int, noise_samples: int, lr: float, seed: int,
                     early_stop_margin: float | None, early_stop_scope: str) -> ShadowConfig:
    """Shadow Attack settings for Table 1: the authors' lambdas with the given budget."""
    return ShadowConfig.paper_smoothing(channels=channels, steps=steps, noise_samples=noise_samples, lr=lr,
                                        seed=seed, early_stop_margin=early_stop_margin,
                                        early_stop_scope=early_stop_scope)


def table1(sigmas: tuple[float, ...] = SIGMAS, n_images: int = 3, n: int = 1000, n0: int = 100,
           alpha: float = 0.001, n_select: int = 200, steps: int = 40, noise_samples: int = 32,
           channels: tuple[int, ...] = (1, 3), lr: float = 0.1, early_stop_margin: float | None = 0.95,
           early_stop_scope: str = "image", seed: int = 0, source: str = "auto",
           device: str | torch.device | None = None,
           out_dir: str | Path | None = "outputs/table1", progress: bool = True) -> TableResult:
    """Table 1 analogue: natural certified accuracy and radius against the Shadow Attack's spoofed certificates."""
    for name, value in (("n_images", n_images), ("n", n), ("n0", n0), ("steps", steps),
                        ("noise_samples", noise_samples)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if not channels or any(c not in (1, 3) for c in channels):
        raise ValueError(f"channels={channels!r} must be a non-empty subset of (1, 3)")
    device = torch.device(device) if device else default_device()
    x, y, _ = load_cifar10("test", n=n_images, source=source)
    settings = {"sigmas": list(sigmas), "n_images": n_images, "n": n, "n0": n0, "alpha": alpha,
                "n_select": n_select, "steps": steps, "noise_samples": noise_samples, "channels": list(channels),
                "lr": lr, "early_stop_margin": early_stop_margin, "early_stop_scope": early_stop_scope, "seed": seed,
                "data": resolve_source("test", source), "device": str(device)}
    rows, per_image, examples = [], [], {}
    t0 = time.time()
    for sigma in tqdm(sigmas, desc="Table 1 (sigma)", disable=not progress):
        model, meta = checkpoints.load(f"smooth-sigma{sigma:.2f}", device=device)
        smooth = Smooth(model, NUM_CLASSES, sigma, device=device)
        natural = smooth.certify(x, n0=n0, n=n, alpha=alpha, seed=seed, progress=progress)
        nat = summarize(natural, y)
        row: dict[str, Any] = {"sigma": sigma, "model": f"smooth-sigma{sigma:.2f}",
                               "natural_certified_accuracy": nat["certified_accuracy"]["0"],
                               "natural_mean_radius": nat["mean_radius_correct"]}
        for ch in channels:
            cfg = smoothing_config(ch, steps, noise_samples, lr, seed, early_stop_margin, early_stop_scope)
            res = attack_smoothing(model, sigma, x, y, cfg, n0=n0, n_select=n_select, n=n, alpha=alpha,
                                   device=device, progress=progress)
            ok = res.success.cpu().numpy()
            radius = res.radius.cpu().numpy()
            row.update({
                f"success_{ch}ch": float(ok.mean()),
                f"spoofed_mean_radius_{ch}ch": _mean(radius[ok].tolist()),
                f"mean_l2_{ch}ch": float(res.l2.mean()), f"mean_linf_{ch}ch": float(res.linf.mean()),
                f"seconds_{ch}ch": round(res.seconds, 1),
            })
            for i in range(len(x)):
                per_image.append({
                    "sigma": sigma, "channels": ch, "index": i, "label": int(y[i]),
                    "natural_prediction": natural[i].prediction, "natural_radius": natural[i].radius,
                    "target": int(res.target[i]), "shadow_prediction": int(res.prediction[i]),
                    "success": bool(ok[i]), "spoofed_radius": float(radius[i]),
                    "l2": float(res.l2[i]), "linf": float(res.linf[i]),
                })
            if ch == channels[0]:
                examples[sigma] = {"x": x.cpu(), "x_shadow": res.x_shadow.cpu(), "y": y.cpu(),
                                   "target": res.target.cpu(), "natural": natural, "radius": radius,
                                   "success": ok}
        rows.append(row)
    settings["seconds"] = round(time.time() - t0, 1)
    claims = table1_claims(rows, channels)
    result = TableResult("table1", rows, per_image, claims, settings, examples=examples)
    result.markdown = table1_markdown(result)
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
    return result


def table1_claims(rows: list[dict[str, Any]], channels: tuple[int, ...]) -> dict[str, Any]:
    """The paper's claim: spoofed mean radii comparable to natural ones (>= 0.7x everywhere, larger somewhere)."""
    ratios = {}
    for r in rows:
        for ch in channels:
            spoof, nat = r.get(f"spoofed_mean_radius_{ch}ch"), r["natural_mean_radius"]
            ratios[f"sigma {r['sigma']:.2f}, {ch}-channel"] = (spoof / nat) if spoof is not None and nat else None
    valid = [v for v in ratios.values() if v is not None]
    per_sigma_best = [max((ratios[f"sigma {r['sigma']:.2f}, {ch}-channel"] or 0.0) for ch in channels) for r in rows]
    return {
        "spoofed_over_natural_radius": ratios,
        "comparable_for_every_sigma": bool(per_sigma_best) and all(v >= RADIUS_RATIO_CLAIM for v in per_sigma_best),
        "larger_for_some_sigma": any(v > 1.0 for v in valid),
        "threshold": RADIUS_RATIO_CLAIM,
    }


def table1_markdown(result: TableResult) -> str:
    chs = result.settings["channels"]
    head = ["sigma", "natural cert. acc.", "natural mean radius"]
    for ch in chs:
        head += [f"{ch}-ch success", f"{ch}-ch spoofed radius", f"{ch}-ch mean L2", f"{ch}-ch mean Linf"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        cells = [f"{r['sigma']:.2f}", _fmt(r["natural_certified_accuracy"], pct=True), _fmt(r["natural_mean_radius"])]
        for ch in chs:
            cells += [_fmt(r[f"success_{ch}ch"], pct=True), _fmt(r[f"spoofed_mean_radius_{ch}ch"]),
                      _fmt(r[f"mean_l2_{ch}ch"], digits=2), _fmt(r[f"mean_linf_{ch}ch"], digits=2)]
        lines.append("| " + " | ".join(cells) + " |")
    s = result.settings
    c = result.claims
    lines += ["", f"{s['n_images']} test images per sigma ({s['data']}), CERTIFY n0 = {s['n0']}, n = {s['n']}, "
              f"alpha = {s['alpha']}; attack: {s['steps']} steps, lr {s['lr']}, {s['noise_samples']} noise samples, "
              f"early stop at {s['early_stop_margin']} (per {s.get('early_stop_scope', 'candidate')}), "
              f"target chosen by CERTIFY with n = {s['n_select']}.",
              f"Natural mean radius: over correctly certified images; spoofed mean radius: over successful shadow "
              f"images (wrong label certified). Claim 'spoofed >= {c['threshold']} x natural for every sigma': "
              f"{'holds' if c['comparable_for_every_sigma'] else 'does NOT hold'}; 'larger for some sigma': "
              f"{'holds' if c['larger_for_some_sigma'] else 'does NOT hold'}."]
    return "\n".join(lines)


def table2(models: list[str] | None = None, n_images: int = 20, steps: int = 60, seed: int = 0,
           cfg: ShadowConfig | None = None, early_stop_margin: float | None = 0.0, source: str = "auto",
           device: str | torch.device | None = None, out_dir: str | Path | None = "outputs/table2",
           progress: bool = True) -> TableResult:
    """Table 2 analogue: verified error of CROWN-IBP models on natural images against the Shadow Attack's error."""
    from .bounds import certified

    if not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images={n_images!r} must be an integer >= 1")
    names = models or [m for m in checkpoints.available() if m.startswith("crownibp-")]
    if not names:
        raise ValueError("no CROWN-IBP checkpoints (crownibp-*) found; train them with "
                         "`python -m shadowlab train --defense crown-ibp ...`")
    device = torch.device(device) if device else default_device()
    cfg = cfg or ShadowConfig.paper_crown_ibp(steps=steps, seed=seed, early_stop_margin=early_stop_margin)
    x, y, _ = load_cifar10("test", n=n_images, source=source)
    settings = {"models": names, "n_images": n_images, "config": cfg.to_dict(),
                "data": resolve_source("test", source), "device": str(device)}
    rows, per_image, examples = [], [], {}
    t0 = time.time()
    for name in tqdm(names, desc="Table 2 (models)", disable=not progress):
        model, meta = checkpoints.load(name, device=device)
        eps = float(meta["defense_parameter"]["eps"])
        with torch.no_grad():
            pred = model(x.to(device)).argmax(1).cpu()
        ok_ibp = certified(model, x, y, eps, "ibp", device=device).cpu()
        ok_crown = certified(model, x, y, eps, "crown-ibp", device=device).cpu()
        verified = (ok_ibp | ok_crown) & (pred == y)  # tightest sound certificate per image
        res = attack_crown_ibp(model, eps, x, y, cfg, device=device, progress=progress)
        success = res.success.cpu().numpy()
        rows.append({"model": name, "arch": meta["arch"], "eps": eps,
                     "clean_error": float((pred != y).float().mean()),
                     "verified_error": 1.0 - float(verified.float().mean()),
                     "attack_error": 1.0 - float(success.mean()),
                     "mean_l2": float(res.l2.mean()), "mean_linf": float(res.linf.mean()),
                     "seconds": round(res.seconds, 1)})
        for i in range(len(x)):
            per_image.append({"model": name, "index": i, "label": int(y[i]), "prediction": int(pred[i]),
                              "verified": bool(verified[i]), "target": int(res.target[i]),
                              "success": bool(success[i]), "margin": float(res.margin[i]),
                              "l2": float(res.l2[i]), "linf": float(res.linf[i])})
        examples[name] = {"x": x.cpu(), "x_shadow": res.x_shadow.cpu(), "y": y.cpu(), "target": res.target.cpu(),
                          "margin": res.margin.cpu().numpy(), "success": success}
    settings["seconds"] = round(time.time() - t0, 1)
    claims = {"attack_error_below_verified_error": {r["model"]: r["attack_error"] < r["verified_error"]
                                                    for r in rows}}
    claims["holds_for_every_model"] = all(claims["attack_error_below_verified_error"].values())
    result = TableResult("table2", rows, per_image, claims, settings, examples=examples)
    result.markdown = table2_markdown(result)
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
    return result


def table2_markdown(result: TableResult) -> str:
    lines = ["| model | eps | clean error | verified error (natural) | attack error (shadow) | mean L2 | mean Linf |",
             "|---|---|---|---|---|---|---|"]
    for r in result.rows:
        lines.append(f"| {r['model']} | {round(r['eps'] * 255)}/255 | {_fmt(r['clean_error'], True)} | "
                     f"{_fmt(r['verified_error'], True)} | {_fmt(r['attack_error'], True)} | "
                     f"{_fmt(r['mean_l2'], digits=2)} | {_fmt(r['mean_linf'], digits=2)} |")
    s = result.settings
    cfg = s["config"]
    lines += ["", f"{s['n_images']} test images per model ({s['data']}); attack: {cfg['steps']} steps, "
              f"{cfg['channels']}-channel, lambda_tv {cfg['lambda_tv']:.3g}, L2 penalty {cfg['l2_penalty']:.3g}. "
              "Attack error = 100% - share of images whose wrong label gets a valid CROWN-IBP/IBP certificate. "
              f"Claim 'attack error < verified error for every model': "
              f"{'holds' if result.claims['holds_for_every_model'] else 'does NOT hold'}."]
    return "\n".join(lines)


def write_outputs(result: TableResult, out_dir: Path) -> None:
    """CSV (per image), JSON (settings, rows, claims), Markdown table and the example figure."""
    from .plots import plot_shadow_examples

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": out_dir / f"{result.name}_per_image.csv", "json": out_dir / f"{result.name}.json",
             "markdown": out_dir / f"{result.name}.md", "figure": out_dir / f"{result.name}.png"}
    with open(files["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result.per_image[0]))
        writer.writeheader()
        writer.writerows(result.per_image)
    result.files = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    files["markdown"].write_text(result.markdown + "\n")
    fig = plot_shadow_examples(result)
    fig.savefig(files["figure"], dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def example_panels(result: TableResult, max_rows: int = 4) -> list[dict[str, Any]]:
    """Natural image, shadow image and captions for the figure: one successful example per row of the table."""
    panels = []
    for key, ex in result.examples.items():
        ok = np.flatnonzero(ex["success"])
        i = int(ok[0]) if len(ok) else 0
        label, target = CLASSES[int(ex["y"][i])], CLASSES[int(ex["target"][i])]
        if result.name == "table1":
            nat = ex["natural"][i]
            nat_text = (f"{CLASSES[nat.prediction]} r={nat.radius:.2f}" if nat.prediction >= 0 else "abstain")
            caption = (f"sigma {key:.2f}: natural {label} ({nat_text})",
                       f"shadow: {target} r={ex['radius'][i]:.2f}" + ("" if ex["success"][i] else " (failed)"))
        else:
            caption = (f"{key}: natural {label}",
                       f"shadow: {target} margin={ex['margin'][i]:.2f}" + ("" if ex["success"][i] else " (failed)"))
        panels.append({"x": ex["x"][i], "x_shadow": ex["x_shadow"][i], "captions": caption})
        if len(panels) >= max_rows:
            break
    return panels
