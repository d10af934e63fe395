"""What one image costs Tables 1 and 2 at the paper's settings, measured on this device, and the wall time of a
paper-scale table on K devices (``python -m shadowlab cost``).

A paper-scale image is too slow to time whole on a CPU (Table 1: 300 attack steps on 9 targets x 400 noise
samples per channel mode, and four CERTIFY runs of n = 100,000). Its cost is linear in the attack steps and in the
CERTIFY samples, so ``table1_image_cost`` times the real per-image work of the table (``table_images.table1_work``,
the paper's other settings unchanged: all targets, no early stop, 400 noise samples, both channel modes, the
controls) at three small (steps, n) points and solves

    seconds(steps, n) = fixed + steps x per_step + n x per_sample

for the three terms; ``check`` times a fourth, larger point against the fit's prediction. ``table2_image_cost``
does the same for Table 2's work in the steps alone. A device is timed after a warm-up call; the minimum of
``repeat`` timings of each point is used, because outside load only adds time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import validate
from .bench_timing import timed_interleaved
from .reproduce import PAPER_TABLE1, PAPER_TABLE2, crown_ibp_config, smoothing_config
from .table_images import table1_work, table2_work


@dataclass(frozen=True)
class ImageCost:
    """Seconds per image of a table's work at the paper's settings, from the fit in the module docstring."""

    table: str
    fixed: float                 # seconds per image that depend neither on steps nor on n
    per_step: float              # seconds per attack step (all channel modes and targets of the image)
    per_sample: float            # seconds per CERTIFY sample (all CERTIFY runs of the image); 0 for Table 2
    steps: int                   # the paper's attack steps
    n: int                       # the paper's CERTIFY samples (0 for Table 2)
    points: list[dict[str, float]]
    device: str

    @property
    def seconds(self) -> float:
        """Predicted seconds of one image at the paper's steps and n."""
        return self.fixed + self.steps * self.per_step + self.n * self.per_sample

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "device": self.device, "seconds_per_image": self.seconds, "fixed": self.fixed,
                "per_step": self.per_step, "per_sample": self.per_sample, "steps": self.steps, "n": self.n,
                "points": self.points}


def _timed(fn, device: torch.device, repeat: int) -> float:
    """Best of ``repeat`` synchronised wall times of fn() (the benchmarks' timer; the warm-up is the caller's)."""
    return timed_interleaved({"run": fn}, device, repeat=repeat, warmup=0)["run"]


def table1_image_cost(model: nn.Module, sigma: float, x: torch.Tensor, y: torch.Tensor,
                      steps: tuple[int, int] = (1, 3), n: tuple[int, int] = (1000, 5000), channels: tuple[int, ...] =
                      (1, 3), repeat: int = 1, check: tuple[int, int] | None = None, seed: int = 0) -> ImageCost:
    """Fit of one Table 1 image's seconds at the paper's settings (PAPER_TABLE1) on x's device.

    model: a smoothed classifier's base network at noise level sigma; x: 1 x C x H x W, y: its label (the image
    timed). steps (s1 < s2) and n (n1 < n2): the small points timed, (s1, n1), (s2, n1), (s1, n2). check: a
    further (steps, n) point timed and returned in ``points`` with the fit's prediction.
    """
    s1, s2 = (validate.count(s, "steps") for s in steps)
    n1, n2 = (validate.count(v, "n") for v in n)
    if s2 <= s1 or n2 <= n1:
        raise ValueError(f"steps={steps!r} and n={n!r} must each be two increasing values")
    if x.dim() != 4 or len(x) != 1:
        raise ValueError(f"x of shape {tuple(x.shape)}: one image, 1 x C x H x W")
    p = PAPER_TABLE1

    def run(k: int, num: int) -> float:
        configs = {ch: smoothing_config(ch, k, p["noise_samples"], 0.1, seed, None, "image", None)
                   for ch in channels}
        work = table1_work(model, sigma, x, y, configs, p["n0"], 200, num, p["alpha"], seed, controls=True)
        return _timed(lambda: work([0]), x.device, repeat)

    run(1, 100)   # warm-up: kernels, allocator, the first CERTIFY
    t11, t21, t12 = run(s1, n1), run(s2, n1), run(s1, n2)
    per_step, per_sample = (t21 - t11) / (s2 - s1), (t12 - t11) / (n2 - n1)
    fixed = t11 - s1 * per_step - n1 * per_sample
    points = [{"steps": s1, "n": n1, "seconds": t11}, {"steps": s2, "n": n1, "seconds": t21},
              {"steps": s1, "n": n2, "seconds": t12}]
    if check is not None:
        ks, kn = check
        points.append({"steps": ks, "n": kn, "seconds": run(ks, kn),
                       "predicted": fixed + ks * per_step + kn * per_sample})
    return ImageCost("table1", fixed, per_step, per_sample, p["steps"], p["n"], points, str(x.device))


def table2_image_cost(model: nn.Module, eps: float, x: torch.Tensor, y: torch.Tensor,
                      steps: tuple[int, int] = (5, 45), repeat: int = 1, check: int | None = None,
                      seed: int = 0) -> ImageCost:
    """Fit of one Table 2 image's seconds at the paper's settings (PAPER_TABLE2: 300 steps, no early stop) on x's
    device: model a certifiably trained network at eps, x 1 x C x H x W, y its label; steps (s1 < s2) timed."""
    s1, s2 = (validate.count(s, "steps") for s in steps)
    if s2 <= s1:
        raise ValueError(f"steps={steps!r} must be two increasing values")

    def run(k: int) -> float:
        work = table2_work(model, eps, x, y, crown_ibp_config(k, seed, None), controls=True)
        return _timed(lambda: work([0]), x.device, repeat)

    run(1)
    t1, t2 = run(s1), run(s2)
    per_step = (t2 - t1) / (s2 - s1)
    fixed = t1 - s1 * per_step
    points = [{"steps": s1, "n": 0, "seconds": t1}, {"steps": s2, "n": 0, "seconds": t2}]
    if check is not None:
        points.append({"steps": check, "n": 0, "seconds": run(check), "predicted": fixed + check * per_step})
    return ImageCost("table2", fixed, per_step, 0.0, PAPER_TABLE2["steps"], 0, points, str(x.device))


def wall_hours(cost: ImageCost, n_images: int, groups: int, devices: int, chunk: int = 1) -> float:
    """Hours of a table of ``groups`` sigmas or models with ``n_images`` each on ``devices`` ranks (torchrun):
    every group's images go out in chunks, round robin, so the slowest rank runs ceil(chunks / devices) of them."""
    n_images, groups, devices, chunk = (validate.count(v, k) for v, k in (
        (n_images, "n_images"), (groups, "groups"), (devices, "devices"), (chunk, "chunk")))
    per_rank = math.ceil(math.ceil(n_images / chunk) / devices) * chunk
    return groups * per_rank * cost.seconds / 3600




def report(table: str, model: nn.Module, parameter: float, x: torch.Tensor, y: torch.Tensor, n_images: int,
           groups: int, devices: tuple[int, ...] = (1, 2, 4, 8, 16), check: bool = False, repeat: int = 1
           ) -> dict[str, Any]:
    """Measure a table's per-image cost (``table1_image_cost`` at sigma = parameter, ``table2_image_cost`` at
    eps = parameter) on x's device and predict the paper-scale table's wall time on each count of ``devices``.
    Returns the cost's dict with "n_images", "groups", "hours" ({K: hours}) and "markdown"."""
    if table == "table1":
        cost = table1_image_cost(model, parameter, x, y, repeat=repeat, check=(6, 10_000) if check else None)
    elif table == "table2":
        cost = table2_image_cost(model, parameter, x, y, repeat=repeat, check=100 if check else None)
    else:
        raise ValueError(f"table={table!r} must be 'table1' or 'table2'")
    hours = {k: wall_hours(cost, n_images, groups, k) for k in devices}
    what = (f"{cost.steps} steps, n = {cost.n:,}" if table == "table1" else f"{cost.steps} steps")
    lines = [f"Per-image cost of {table} at the paper's settings ({what}) on {cost.device}: "
             f"{cost.seconds:,.0f} s = {cost.fixed:.1f} s fixed + {cost.steps} x {cost.per_step:.3f} s per step"
             + (f" + {cost.n:,} x {1e3 * cost.per_sample:.3f} ms per CERTIFY sample" if cost.n else "") + ".", "",
             f"| {cost.device} devices | wall time of {groups} x {n_images} images |", "|---|---|"]
    lines += [f"| {k} | {h:,.1f} h |" for k, h in hours.items()]
    for p in cost.points:
        if "predicted" in p:
            lines += ["", f"Fit check: {p['steps']} steps, n = {p['n']}: measured {p['seconds']:.1f} s, "
                          f"predicted {p['predicted']:.1f} s."]
    return {**cost.to_dict(), "n_images": n_images, "groups": groups, "hours": hours, "markdown": "\n".join(lines)}


__all__ = ["ImageCost", "report", "table1_image_cost", "table2_image_cost", "wall_hours"]
