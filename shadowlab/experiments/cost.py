"""What one image costs Tables 1 and 2 at the paper's settings, measured on this device, and the wall time of a
paper-scale table on K devices (``python -m shadowlab cost``).

A paper-scale image is too slow to time whole on a CPU (Table 1: 300 attack steps on 9 targets x 400 noise
samples per channel mode, and three CERTIFY runs of n = 100,000). Its cost is linear in the attack steps and in the
CERTIFY samples, so ``table1_image_cost`` times the real batched work of the table (``table_images.table1_work`` on
one chunk of images, the chunk the table would run with on this device; the paper's other settings unchanged: all
targets, no early stop, 400 noise samples, both channel modes, the controls) at a few (steps, n) points and solves

    seconds(steps, n) = fixed + steps x per_step + n x per_sample

for the three terms, then divides by the chunk. Every timed point is sized to take at least ``min_seconds`` (1 s by
default) on the device at hand: the steps double from 1 until the first point does; the second point's steps
(Table 1: from three times the first's, doubling) and n (the n term is timed without the controls: a control's
CERTIFY draws its n samples only where a wrong label can be certified, which depends on how far the attack got: a
few steps in it often can, after the attack rarely) grow until each adds at least the first point's time, so that
the difference is not lost in the timing noise (a paper image's fixed work, the first steps on every target
and the selection, is most of a short point's time). A GPU that finishes a small point in milliseconds is thus
timed on work long enough to measure. ``check`` times one more point, twice the largest, against the fit's prediction.

A search with an early stop (``Table1Settings.paper_pruned``) runs a number of steps that depends on the image, so
the fit's points run every step (the early stop off) and the prediction is made for the steps an image runs:
``check`` then times the real thing, the chunk at the table's own settings, and predicts it from the steps its calls
ran (without ``check`` the prediction counts every step, an upper bound). ``table2_image_cost`` does the same for
Table 2's work in the steps alone. The device is timed after a warm-up call; the minimum of ``repeat`` timings of
each point is used, because outside load only adds time.

Several processes can share one device, e.g. two single-thread ranks on a CPU (``OMP_NUM_THREADS=1 torchrun
--nproc_per_node 2``; on 2 cores they were no faster per image than one process on two threads, docs/results.md).
Under torchrun every rank times the same
points at the same time and uses the ranks' mean timing of each (``agree``: an all-reduce, which also starts the next
point on every rank at once), so every rank makes the same fit; ``ImageCost.ranks`` records how many shared the
device: each image then takes ``seconds`` on its rank and the table advances one image every ``seconds / ranks``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shadowlab import validate
from shadowlab.experiments.settings import Table1Settings, Table2Settings
from shadowlab.experiments.table_images import table1_work, table2_work
from shadowlab.tables import markdown_table
from shadowlab.timing import timed_call, timed_interleaved

MIN_SECONDS = 1.0


@dataclass(frozen=True)
class ImageCost:
    """Seconds per image of a table's work at the paper's settings, from the fit in the module docstring, for
    images run ``chunk`` at a time."""

    table: str
    fixed: float                 # seconds per image that depend neither on steps nor on n
    per_step: float              # seconds per attack step (all channel modes and targets of the image)
    per_sample: float            # seconds per CERTIFY sample (all CERTIFY runs of the image); 0 for Table 2
    steps: int                   # the paper's attack steps
    n: int                       # the paper's CERTIFY samples (0 for Table 2)
    points: list[dict[str, float]]
    device: str
    chunk: int = 1               # images per call of the timed work
    steps_run: float | None = None   # an early-stopped search: the mean steps its check images ran (else all steps)
    ranks: int = 1               # processes timed side by side on the device (torchrun ranks sharing a CPU)
    threads: int | None = None   # torch's intra-op threads of each timed process
    runs: int = 0                # Table 1: CERTIFY runs of n that per_sample counts (the natural image, each shadow)
    control_runs: int = 0        # Table 1: at most this many more, the controls' own (drawn only where needed)

    @property
    def seconds(self) -> float:
        """Predicted seconds of one image on its rank at the paper's n and steps (those an early stop ran, when
        measured)."""
        steps = self.steps if self.steps_run is None else self.steps_run
        return self.fixed + steps * self.per_step + self.n * self.per_sample

    @property
    def seconds_all_controls(self) -> float:
        """``seconds`` of an image on which every control draws its own n samples (``control_runs`` more CERTIFY
        runs; a control draws them only where a wrong label can be certified), the most an image costs."""
        return self.seconds + (self.control_runs * self.n * self.per_sample / self.runs if self.runs else 0.0)

    @property
    def table_seconds(self) -> float:
        """Seconds of table progress per image on one device: ``seconds`` over the ranks that share it."""
        return self.seconds / self.ranks

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "device": self.device, "chunk": self.chunk, "ranks": self.ranks,
                "threads": self.threads, "seconds_per_image": self.table_seconds,
                "seconds_per_image_all_controls": self.seconds_all_controls / self.ranks,
                "certify_runs": self.runs, "control_runs": self.control_runs,
                "seconds_per_image_per_rank": self.seconds, "fixed": self.fixed, "per_step": self.per_step,
                "per_sample": self.per_sample, "steps": self.steps, "steps_run": self.steps_run, "n": self.n,
                "points": self.points}


def _timed(fn, device: torch.device, repeat: int) -> float:
    """Best of ``repeat`` synchronised wall times of fn() (the benchmarks' timer; the warm-up is the caller's)."""
    return timed_interleaved({"run": fn}, device, repeat=repeat, warmup=0)["run"]


def _grow(run: Callable[[int], float], start: int, seconds: float) -> tuple[int, float]:
    """The first of start, 2 start, 4 start, ... whose timing run(k) is at least ``seconds``, with that timing."""
    k, t = start, run(start)
    while t < seconds:
        k *= 2
        t = run(k)
    return k, t


def _images(x: torch.Tensor, y: torch.Tensor) -> list[int]:
    if x.dim() != 4 or len(x) < 1 or y.shape != (len(x),):
        raise ValueError(f"x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}: a chunk of images, "
                         "B x C x H x W, and its B labels")
    return list(range(len(x)))


def table1_image_cost(model: nn.Module, sigma: float, x: torch.Tensor, y: torch.Tensor,
                      settings: Table1Settings | None = None, repeat: int = 1, check: bool = False,
                      n_start: int = 1000, min_seconds: float = MIN_SECONDS,
                      agree: Callable[[float], float] | None = None, ranks: int = 1) -> ImageCost:
    """Fit of one Table 1 image's seconds at the paper's settings (``Table1Settings.paper()``, or ``settings``: the
    procedure the table runs, e.g. with ``keep_targets``) on x's device.

    model: a smoothed classifier's base network at noise level sigma; x: the chunk of images timed together
    (B x C x H x W, B = the chunk the table would use), y: their labels. The points are sized as in the module
    docstring from n_start CERTIFY samples, with at least prune_step steps when targets are pruned; check=True
    times a fourth point against the prediction (``points``). The controls' CERTIFY draws n samples only where a
    wrong label can be certified (``Smooth.certify_where``), so that term depends on the images timed. agree: maps
    this process's timing of a point to the one the fit uses (``ranks`` torchrun ranks timing side by side on one
    device pass their mean, see the module docstring; default the timing itself).
    """
    ids = _images(x, y)
    agree = agree or (lambda t: t)
    ranks = validate.count(ranks, "ranks")
    min_seconds = validate.number(min_seconds, "min_seconds", low=0.0)
    n1 = validate.count(n_start, "n_start")
    p = settings or Table1Settings.paper()
    linear = p.replace(early_stop_margin=None, controls=True)   # every step runs: seconds linear in the steps

    def run(k: int, num: int, controls: bool = True) -> float:
        work = table1_work(model, sigma, x, y, linear.replace(steps=k, n=num, controls=controls))
        return agree(_timed(lambda: work(ids), x.device, repeat))

    run(1, 100)   # warm-up: kernels, allocator, the first CERTIFY
    # with target pruning (keep_targets) a step costs less after prune_step: time only steps past it, where the
    # cost is linear in the steps again (the extra cost of the first prune_step steps lands in ``fixed``)
    first = p.shadow_config(p.channels[0]).prune_step if p.keep_targets is not None else 1
    s1, t11 = _grow(lambda k: run(k, n1), first, min_seconds)
    s2, t21 = _grow(lambda k: run(k, n1), 3 * s1, t11 + max(min_seconds, t11))
    # the n term without the controls: a control draws its n samples only where a wrong label can be certified,
    # which after a few steps (a shadow still near its noisy start) it often can and after the attack rarely; so the
    # fit counts the natural and final CERTIFY runs, and what the controls draw shows in the check
    t0 = run(s1, n1, controls=False)
    n2, t12 = _grow(lambda v: run(s1, v, controls=False), 2 * n1, t0 + max(min_seconds, t0))
    per_step, per_sample = (t21 - t11) / (s2 - s1), (t12 - t0) / (n2 - n1)
    fixed = t11 - s1 * per_step - n1 * per_sample
    points = [{"steps": s1, "n": n1, "seconds": t11}, {"steps": s2, "n": n1, "seconds": t21},
              {"steps": s1, "n": n1, "seconds": t0, "controls": False},
              {"steps": s1, "n": n2, "seconds": t12, "controls": False}]
    steps_run = None
    if check and p.early_stop_margin is not None:
        # the steps an image runs depend on it: the check is the table's own work on the chunk at the paper's
        # steps and n, predicted from the steps its calls ran (mean over the images and channel modes)
        seconds, recs = timed_call(lambda: table1_work(model, sigma, x, y, p.replace(controls=True))(ids), x.device)
        seconds = agree(seconds)
        steps_run = agree(sum(r[f"ch{ch}"]["steps_run"] for r in recs for ch in p.channels)
                          / (len(recs) * len(p.channels)))
        points.append({"steps": p.steps, "n": p.n, "seconds": seconds, "steps_run": steps_run,
                       "predicted": fixed + steps_run * per_step + p.n * per_sample})
    elif check:
        ks, kn = 2 * s2, 2 * n2
        points.append({"steps": ks, "n": kn, "seconds": run(ks, kn),
                       "predicted": fixed + ks * per_step + kn * per_sample})
    b = len(ids)
    # per_sample counts the natural image's CERTIFY and each shadow's; with the controls, the initialisation and the
    # smooth noise of each channel mode may draw n samples too (the natural-image control reuses the natural one's)
    runs, control_runs = 1 + len(p.channels), (2 * len(p.channels) if p.controls else 0)
    return ImageCost("table1", fixed / b, per_step / b, per_sample / b, p.steps, p.n, points, str(x.device), b,
                     steps_run, ranks, torch.get_num_threads(), runs, control_runs)


def table2_image_cost(model: nn.Module, eps: float, x: torch.Tensor, y: torch.Tensor, repeat: int = 1,
                      check: bool = False, seed: int = 0, min_seconds: float = MIN_SECONDS,
                      agree: Callable[[float], float] | None = None, ranks: int = 1) -> ImageCost:
    """Fit of one Table 2 image's seconds at the paper's settings (``Table2Settings.paper()``: 300 steps, no early
    stop) on x's device: model a certifiably trained network at eps, x the chunk of images timed together, y their
    labels; points sized as in the module docstring, check=True times a fourth one against the prediction; agree and
    ranks as in ``table1_image_cost``."""
    ids = _images(x, y)
    agree = agree or (lambda t: t)
    ranks = validate.count(ranks, "ranks")
    min_seconds = validate.number(min_seconds, "min_seconds", low=0.0)
    p = Table2Settings.paper(seed=seed)

    def run(k: int) -> float:
        work = table2_work(model, eps, x, y, p.shadow_config(steps=k), controls=True)
        return agree(_timed(lambda: work(ids), x.device, repeat))

    run(1)
    s1, t1 = _grow(run, 1, min_seconds)
    s2 = 3 * s1
    t2 = run(s2)
    per_step = (t2 - t1) / (s2 - s1)
    fixed = t1 - s1 * per_step
    points = [{"steps": s1, "n": 0, "seconds": t1}, {"steps": s2, "n": 0, "seconds": t2}]
    if check:
        points.append({"steps": 2 * s2, "n": 0, "seconds": run(2 * s2), "predicted": fixed + 2 * s2 * per_step})
    b = len(ids)
    return ImageCost("table2", fixed / b, per_step / b, 0.0, p.steps, 0, points, str(x.device), b,
                     ranks=ranks, threads=torch.get_num_threads())


def wall_hours(cost: ImageCost, n_images: int, groups: int, devices: int, chunk: int | None = None) -> float:
    """Hours of a table of ``groups`` sigmas or models with ``n_images`` each on ``devices`` devices, each running
    ``cost.ranks`` torchrun ranks side by side as timed: every group's images go out in chunks (default the cost's own
    chunk), round robin, so the slowest rank runs ceil(chunks / (devices x ranks)) of them, ``cost.seconds`` each."""
    chunk = cost.chunk if chunk is None else chunk
    n_images, groups, devices, chunk = (validate.count(v, k) for v, k in (
        (n_images, "n_images"), (groups, "groups"), (devices, "devices"), (chunk, "chunk")))
    per_rank = math.ceil(math.ceil(n_images / chunk) / (devices * cost.ranks)) * chunk
    return groups * per_rank * cost.seconds / 3600


def report(table: str, model: nn.Module, parameter: float, x: torch.Tensor, y: torch.Tensor, n_images: int,
           groups: int, devices: tuple[int, ...] = (1, 2, 4, 8, 16), check: bool = False, repeat: int = 1,
           settings: Table1Settings | None = None, agree: Callable[[float], float] | None = None,
           ranks: int = 1) -> dict[str, Any]:
    """Measure a table's per-image cost (``table1_image_cost`` at sigma = parameter, ``table2_image_cost`` at
    eps = parameter) on x's device and predict the paper-scale table's wall time on each count of ``devices``;
    settings: Table 1's procedure (default ``Table1Settings.paper()``, every target and step; e.g.
    ``Table1Settings.paper_pruned()``). x holds the chunk of images timed together (the chunk the table would use on
    this device); agree and ranks: torchrun ranks timing side by side on one device (``table1_image_cost``). Returns
    the cost's dict with "n_images", "groups", "hours" ({K: hours}), "procedure" and "markdown"."""
    p = settings or Table1Settings.paper()
    timing = {"repeat": repeat, "check": check, "agree": agree, "ranks": ranks}
    if table == "table1":
        cost = table1_image_cost(model, parameter, x, y, p, **timing)
    elif table == "table2":
        cost = table2_image_cost(model, parameter, x, y, **timing)
    else:
        raise ValueError(f"table={table!r} must be 'table1' or 'table2'")
    hours = {k: wall_hours(cost, n_images, groups, k) for k in devices}
    what = (f"{cost.steps} steps, n = {cost.n:,}" if table == "table1" else f"{cost.steps} steps")
    procedure = {}
    if table == "table1":
        procedure = {"keep_targets": p.keep_targets, "early_stop_margin": p.early_stop_margin,
                     "early_stop_scope": p.early_stop_scope}
        if p.keep_targets is not None:
            what += f", {p.keep_targets} target(s) kept after the prune step"
        if p.early_stop_margin is not None:
            settle = ("" if p.settle_window is None else
                      f" or once its objective fell by less than {p.settle_tol} over {p.settle_window} steps")
            what += (f", a candidate stops at {p.early_stop_margin} of its training noise on the target{settle}: "
                     + (f"{cost.steps_run:.1f} steps run on the check images" if cost.steps_run is not None else
                        "every step counted, an upper bound (--check times the steps it runs)"))
    layout = (f"{cost.ranks} ranks side by side ({cost.threads} thread(s) each), each image on its rank in "
              f"{cost.seconds:,.1f} s" if cost.ranks > 1 else f"{cost.threads} thread(s)")
    lines = [f"Per-image cost of {table} at the paper's settings ({what}) on {cost.device}, {layout}, images run "
             f"{cost.chunk} at a time: **{cost.table_seconds:,.1f} s per image**"
             + (f" of table progress ({cost.seconds:,.1f} s / {cost.ranks} ranks); per rank " if cost.ranks > 1
                else " = ") + f"{cost.fixed:.2f} s fixed + "
             f"{cost.steps if cost.steps_run is None else round(cost.steps_run, 1)} x {cost.per_step:.4f} s per step"
             + (f" + {cost.n:,} x {1e3 * cost.per_sample:.3f} ms per CERTIFY sample" if cost.n else "") + "."
             + (f" That counts {cost.runs} CERTIFY runs of n (the natural image, each shadow); a control draws n "
                f"samples of its own where a wrong label can be certified, up to {cost.control_runs} more runs: "
                f"{cost.seconds_all_controls / cost.ranks:,.1f} s per image when all do."
                if cost.control_runs else ""), "",
             markdown_table([(f"{cost.device} devices" + (f" ({cost.ranks} ranks each)" if cost.ranks > 1 else ""),
                              "devices", "str"),
                             (f"wall time of {groups} x {n_images} images", "hours", lambda h: f"{h:,.1f} h")],
                            [{"devices": k, "hours": h} for k, h in hours.items()])]
    for pt in cost.points:
        if "predicted" in pt:
            off = pt["seconds"] / pt["predicted"] - 1
            ran = f" ({pt['steps_run']:.1f} run)" if "steps_run" in pt else ""
            each = " on each rank" if cost.ranks > 1 else ""
            lines += ["", f"Fit check ({cost.chunk} images{each}): {pt['steps']} steps{ran}, n = {pt['n']}: measured "
                          f"{pt['seconds']:.2f} s, predicted {pt['predicted']:.2f} s ({100 * off:+.1f}%)."]
    return {**cost.to_dict(), "n_images": n_images, "groups": groups, "hours": hours, "procedure": procedure,
            "markdown": "\n".join(lines)}


__all__ = ["ImageCost", "report", "table1_image_cost", "table2_image_cost", "wall_hours"]
