"""Benchmarks (`python -m shadowlab bench`): the Shadow Attack against ART's ShadowAttack, one attack step and
certification against the model's bare throughput, and the cost of IBP / CROWN-IBP / CROWN bounds.

Every figure is a wall-clock measurement on this machine (median of repeats after a warm-up where a repeat is
cheap); nothing here asserts a time. ART (adversarial-robustness-toolbox, `requirements-bench.txt`) is only
needed for the comparison against it.

This module holds the attack-step, certification and bound benchmarks, the driver and the tables; the settings are
``bench.settings``, the comparison with ART ``bench.art`` and the timing helpers ``timing``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from shadowlab import checkpoints
from shadowlab.bench.art import bench_shadow_vs_art, require_art
from shadowlab.bench.settings import BenchSettings
from shadowlab.certify.bounds import METHODS, lower_bounds, margin_spec
from shadowlab.certify.smoothing import Smooth
from shadowlab.data import load_cifar10, resolve_source
from shadowlab.models import NUM_CLASSES, default_device
from shadowlab.perception import MIN_SSIM
from shadowlab.precision import compute_precision
from shadowlab.shadow.attack import attack_smoothing
from shadowlab.shadow.config import ShadowConfig
from shadowlab.shadow.inputs import resolve_targets
from shadowlab.tables import markdown_table as report_table
from shadowlab.timing import machine, synchronize, timed_interleaved

# the block of a Markdown file that `python -m shadowlab bench --readme FILE` rewrites with its tables; without
# --readme no Markdown file is changed besides OUT/bench.md
README_START, README_END = "<!-- bench:start (written by python -m shadowlab bench) -->", "<!-- bench:end -->"


def _fmt(model: nn.Module) -> torch.memory_format:
    return torch.channels_last if any(isinstance(m, nn.Conv2d) for m in model.modules()) else torch.contiguous_format


# ------------------------------------------------------------------------------------------ attack step
def bare_forward_backward(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> None:
    """The limit for one attack step: forward and input-gradient backward of the model over the same inputs."""
    fmt = _fmt(model)
    for s in range(0, len(inputs), batch_size):
        d = inputs[s:s + batch_size].contiguous(memory_format=fmt).requires_grad_(True)
        loss = F.cross_entropy(model(d), targets[s:s + batch_size], reduction="sum")
        torch.autograd.grad(loss, d)


def bench_attack_step(model: nn.Module, sigma: float, x: torch.Tensor, y: torch.Tensor, cfg: ShadowConfig,
                      device: torch.device, extra_steps: int = 4, batch_size: int = 1024) -> dict[str, Any]:
    """Seconds per Shadow Attack step (difference of a 2-step and a (2 + extra_steps)-step run, so the fixed
    selection CERTIFY cancels) against one bare forward + backward over the same (candidate x noise) batch, both in
    cfg.precision."""
    cfg = replace(cfg, early_stop_margin=None)
    targets = resolve_targets("all", y.to(device), NUM_CLASSES)
    candidates = targets.numel()

    def run(steps: int) -> Callable[[], Any]:
        return lambda: attack_smoothing(model, sigma, x, y, replace(cfg, steps=steps), n=None, n_select=1,
                                        progress=False, device=device, batch_size=batch_size)

    m = candidates * cfg.noise_samples
    inputs = torch.rand(m, *x.shape[1:], device=device)
    labels = torch.randint(0, NUM_CLASSES, (m,), device=device)
    model.eval()
    def bare() -> None:
        with compute_precision(cfg.precision, device):
            bare_forward_backward(model, inputs, labels, batch_size)

    t = timed_interleaved({"short": run(2), "long": run(2 + extra_steps), "bare": bare}, device)
    step, bare = max(t["long"] - t["short"], 1e-9) / extra_steps, t["bare"]
    return {"images": len(x), "candidates": candidates, "noise_samples": cfg.noise_samples, "precision": cfg.precision,
            "batch": m, "step_seconds": step, "bare_seconds": bare, "fraction_of_limit": bare / step}


# ------------------------------------------------------------------------------------------ certification
def reference_counts(model: nn.Module, x: torch.Tensor, num: int, sigma: float, batch_size: int,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Cohen et al.'s reference sampling (core.py `_sample_noise`): one image at a time, noise drawn per batch on
    the device, predictions copied to the host and counted in NumPy. The baseline, not for use."""
    out = np.zeros((len(x), num_classes), dtype=np.int64)
    with torch.no_grad():
        for i, img in enumerate(x):
            remaining = num
            while remaining > 0:
                this = min(batch_size, remaining)
                remaining -= this
                batch = img.repeat((this, 1, 1, 1))
                preds = model(batch + torch.randn_like(batch) * sigma).argmax(1)
                out[i] += np.bincount(preds.cpu().numpy(), minlength=num_classes)
    return out


def bare_forward(model: nn.Module, num: int, shape: tuple[int, ...], batch_size: int,
                 device: torch.device) -> None:
    """The limit for certification: forward passes over `num` inputs in batches, nothing else."""
    fmt = _fmt(model)
    batch = torch.rand(batch_size, *shape, device=device).contiguous(memory_format=fmt)
    with torch.inference_mode():
        for s in range(0, num, batch_size):
            model(batch[:min(batch_size, num - s)])


def bench_certify(model: nn.Module, sigma: float, x: torch.Tensor, n0: int, n: int, alpha: float,
                  device: torch.device, batch_size: int = 1000, repeat: int = 3, precision: str = "fp32"
                  ) -> dict[str, Any]:
    """Noise samples per second (best of `repeat` interleaved rounds): Smooth.certify on a batch of images, the
    per-image NumPy loop, bare forward; CERTIFY and the bare forward in ``precision``."""
    smooth = Smooth(model, NUM_CLASSES, sigma, device=device, precision=precision)

    def bare() -> None:
        with compute_precision(precision, device):
            bare_forward(model, total, tuple(x.shape[1:]), batch_size, device)

    x = x.to(device)
    total = len(x) * (n0 + n)
    smooth.certify(x[:1], n0, min(n, batch_size), alpha, batch_size=batch_size)   # warm-up, one image
    t = timed_interleaved({
        "smooth": lambda: smooth.certify(x, n0, n, alpha, batch_size=batch_size),
        "loop": lambda: (reference_counts(model, x, n0, sigma, batch_size),
                         reference_counts(model, x, n, sigma, batch_size)),
        "bare": bare}, device, repeat=repeat, warmup=0)
    t_smooth, t_loop, t_bare = t["smooth"], t["loop"], t["bare"]
    return {"images": len(x), "samples": total, "precision": precision, "smooth_per_s": total / t_smooth,
            "numpy_loop_per_s": total / t_loop, "bare_forward_per_s": total / t_bare,
            "speedup_over_loop": t_loop / t_smooth, "fraction_of_limit": t_bare / t_smooth}


# ------------------------------------------------------------------------------------------------ bounds


def _bound(method: str, model: nn.Module, x: torch.Tensor, eps: float, C: torch.Tensor) -> Any:
    return lower_bounds(model, x, eps, C, method)


def bench_bounds(names: list[str], x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 chunk: int = 25) -> list[dict[str, Any]]:
    """Seconds for IBP, CROWN-IBP and CROWN lower bounds on the verification margins of len(x) images."""
    rows = []
    xs, ys = x.to(device), y.to(device)
    C = margin_spec(ys, NUM_CLASSES)
    for name in tqdm(names, desc="bounds", leave=False):
        model, meta = checkpoints.load(name, device=device)
        eps = float(meta["defense_parameter"]["eps"])
        row: dict[str, Any] = {"model": name, "eps": eps, "images": len(x)}
        with torch.no_grad():
            for method in METHODS:
                synchronize(device)
                t0 = time.perf_counter()
                for s in range(0, len(xs), chunk):
                    _bound(method, model, xs[s:s + chunk], eps, C[s:s + chunk])
                synchronize(device)
                row[f"{method}_seconds"] = time.perf_counter() - t0
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ driver
def run_bench(s: BenchSettings | None = None, device: torch.device | str | None = None,
              out_dir: str | Path | None = "data/results", progress: bool = True, command: str | None = None,
              **data: Any) -> dict[str, Any]:
    """Run every benchmark; write bench.json and bench.md to out_dir; return the results.

    `data` goes to load_cifar10 (source, jpeg, download)."""
    s = s if s is not None else BenchSettings()
    device = torch.device(device) if device is not None else default_device()
    n_load = max(s.n_images, s.certify_images, s.bound_images)
    x, y, _ = load_cifar10("test", n=n_load, **data)
    model, meta = checkpoints.load(s.model, device=device)
    sigma = float(meta["defense_parameter"]["sigma"])
    model.eval()
    if s.art:
        require_art()   # fail before the long stages, not after them
    results: dict[str, Any] = {"machine": machine(), "settings": {**asdict(s), "command": command},
                               "data": resolve_source("test", data.get("source", "auto"), jpeg=data.get("jpeg")),
                               "sigma": sigma}
    t0 = time.perf_counter()
    step_cfg = ShadowConfig.paper_smoothing(channels=3, noise_samples=s.noise_samples, lr=s.lr, seed=s.seed,
                                            precision=s.precision)
    stages: dict[str, Callable[[], Any]] = {
        "attack_step": lambda: bench_attack_step(model, sigma, x[:2], y[:2], step_cfg, device),
        "certify": lambda: bench_certify(model, sigma, x[:s.certify_images], s.n0, s.certify_n, s.alpha, device,
                                         precision=s.precision),
        "shadow_vs_art": lambda: bench_shadow_vs_art(model, sigma, x[:s.n_images], y[:s.n_images], s, device,
                                                     progress),
        "bounds": lambda: bench_bounds([k for k in checkpoints.available() if k.startswith("crownibp-")],
                                       x[:s.bound_images], y[:s.bound_images], device),
    }
    bar = tqdm(stages.items(), desc="bench", disable=not progress)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for key, stage in bar:
        bar.set_postfix_str(key)
        results[key] = stage()
        if out is not None:   # a long run that is stopped keeps the stages it finished
            (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["markdown"] = markdown_table(results)
    if out is not None:
        (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "bench.md").write_text(results["markdown"] + "\n")
    return results


def readme_block(readme: str | Path) -> tuple[str, int, int]:
    """The README's text and the span between README_START and README_END; raises ValueError without them."""
    path = Path(readme)
    if not path.is_file():
        raise ValueError(f"readme={str(path)!r} is not a file")
    text = path.read_text()
    i, j = text.find(README_START), text.find(README_END)
    if i < 0 or j < i:
        raise ValueError(f"readme={str(path)!r} has no block '{README_START}' ... '{README_END}' to rewrite")
    return text, i + len(README_START), j


def update_readme(readme: str | Path, markdown: str) -> None:
    """Replace the text between README_START and README_END in `readme` with a run's tables."""
    text, i, j = readme_block(readme)
    Path(readme).write_text(text[:i] + "\n" + markdown.strip() + "\n" + text[j:])


def run_label(v: dict[str, Any], s: dict[str, Any]) -> str:
    """How a shadowlab run of the ART comparison searched: targets kept, early stop, steps run."""
    keep, m = v.get("keep_targets"), v.get("early_stop_margin")
    parts = ["all targets in one batch" if keep is None else
             f"all targets for {s.get('prune_step', 5)} steps, then the best {keep} per image"]
    parts.append(f"stop an {s['early_stop_scope']} at target votes >= {m}" if m is not None else "no early stop")
    parts.append("fresh noise every step" if v.get("noise") == "fresh" else "one noise draw for all steps")
    return ", ".join(parts) + f", {v['steps_run']} steps run"


def markdown_table(r: dict[str, Any]) -> str:
    """README tables of a run_bench result (each table through ``shadowlab.tables.markdown_table``)."""
    s, m = r["settings"], r["machine"]
    lines = ([f"Command: `{s['command']}` ({r['seconds'] / 60:.0f} minutes).", ""]
             if s.get("command") and "seconds" in r else [])
    lines += [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads, "
              f"{m['device']}), ART {m['art'] or 'not installed'}.", ""]
    va = r["shadow_vs_art"]
    lines += [f"Shadow Attack against ART on {s['n_images']} test images of `{s['model']}` (sigma {r['sigma']}): "
              f"3 channels, every wrong target, {s['steps']} steps, lr {s['lr']}, {s['noise_samples']} noise samples, "
              f"lambda_tv {s['lambda_tv']}, lambda_c {s['lambda_c']}, lambda_s {s['lambda_s']}; best target by "
              f"CERTIFY(n0={s['n0']}, n={s['n_select']}), final CERTIFY(n0={s['n0']}, n={s['n']}, "
              f"alpha={s['alpha']}) for every attack.", "",
              f"Success: the wrong label is certified AND SSIM(shadow, natural) >= {s.get('min_ssim', MIN_SSIM)} "
              "(the same definition for both attacks); spoof rate: certified whatever the SSIM.", ""]

    def row(label: str, v: dict[str, Any]) -> dict[str, Any]:
        ratio = v.get("time_ratio_art_over_this")
        return {"attack": label, "seconds": v["seconds_per_image"], "success": v["success_rate"],
                "spoof": v.get("spoof_rate"), "ssim": v.get("mean_ssim"), "radius": v["mean_spoofed_radius"],
                "paired": (f"{v['radius_minus_art']:+.3f} ± {v['radius_minus_art_se']:.3f}"
                           if "radius_minus_art" in v else None),
                "l2": v["mean_l2"], "linf": v["mean_linf"], "ratio": None if ratio is None else f"{ratio:.1f}x"}

    rows = [row(f"shadowlab ({run_label(v, s)})", v) for v in va.get("shadowlab_runs", [va["shadowlab"]])]
    rows += [row(label, va[key]) for key, label in (
        ("art_mean", "ART ShadowAttack, loss reduction='mean' (as documented)"),
        ("art_sum", "ART ShadowAttack, loss reduction='sum' (authors' step)")) if key in va]
    lines.append(report_table([("attack", "attack", "str"), ("s/image", "seconds", "1"),
                               ("success (SSIM >= min)", "success", "pct0"), ("spoof rate", "spoof", "pct0"),
                               ("mean SSIM", "ssim", "3"), ("mean radius of successes", "radius", "3"),
                               ("radius - ART's, per image (± s.e.)", "paired", "str"), ("mean L2", "l2", "2"),
                               ("mean Linf", "linf", "2"), ("ART time / this", "ratio", "str")], rows))
    if "time_ratio_art_over_shadowlab" in va:
        h = va["shadowlab"]
        which = ("the fastest run no worse than ART in success rate and mean spoofed radius"
                 if h.get("no_worse_than_art")
                 else "no run matched ART's success rate and mean spoofed radius; the best one")
        lines += ["", f"Time ratio, ART ({va['art_peer'].split('_')[1]}, the better of the two) / shadowlab "
                      f"({which}: {run_label(h, s)}): **{va['time_ratio_art_over_shadowlab']:.1f}x**."]
    a, c = r["attack_step"], r["certify"]
    limits = [{"what": f"attack step ({a['candidates']} candidates x {a['noise_samples']} noise = {a['batch']} inputs)",
               "this": f"{a['step_seconds']:.3f} s", "limit": f"{a['bare_seconds']:.3f} s (bare forward + backward)",
               "fraction": a["fraction_of_limit"]},
              {"what": f"certification ({c['images']} images x {c['samples'] // c['images']} samples)",
               "this": f"{c['smooth_per_s']:.0f} samples/s",
               "limit": f"{c['bare_forward_per_s']:.0f} samples/s (bare forward)", "fraction": c["fraction_of_limit"]}]
    lines += ["", report_table([("hardware limit", "what", "str"), ("shadowlab", "this", "str"),
                                ("limit", "limit", "str"), ("fraction of the limit", "fraction", "pct0")], limits),
              "", f"Per-image NumPy loop as in Cohen et al.'s code: {c['numpy_loop_per_s']:.0f} samples/s; "
                  f"Smooth.certify is {c['speedup_over_loop']:.2f}x faster."]
    if r["bounds"]:
        rows = [{**b, "eps_255": f"{b['eps'] * 255:.0f}/255"} for b in r["bounds"]]
        lines += ["", report_table([("CROWN-IBP model", "model", "str"), ("eps", "eps_255", "str"),
                                    ("IBP (s)", "ibp_seconds", "2"), ("CROWN-IBP (s)", "crown-ibp_seconds", "2"),
                                    ("CROWN (s)", "crown_seconds", "2")], rows)]
        lines.append(f"\nBounds on the verification margins of {r['bounds'][0]['images']} test images.")
    return "\n".join(lines)
