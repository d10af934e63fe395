"""Does the pruned Table 1 search lose anything? The exhaustive Shadow Attack search of Table 1 at the paper's
settings (``Table1Settings.paper``: every wrong target, no early stop) against the pruned one the CPU table runs
(``Table1Settings.paper_pruned``: one target kept after the prune step, a candidate stops at a share of its training
noise on the target), on held-out test images, both judged by the table's CERTIFY. Per image and channel mode:
whether each succeeds (a wrong label certified, SSIM >= min_ssim), its spoofed radius, target and seconds.

Held-out images: subset images ``first`` (900) onwards, ``per_sigma`` per sigma (sigma k takes the k-th block),
which no committed table or lesson reports. Each (procedure, sigma) is one resumable record file
(``experiments.runs.run_images``): a run killed or cut by the end of a session goes on where it stopped with the same
call, and a GPU can take over the rest. The controls are not run (they do not depend on the search).
``scripts/table1_pruning.py`` is the command line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from shadowlab import checkpoints, validate
from shadowlab.data import load_cifar10
from shadowlab.experiments.runs import run_images
from shadowlab.experiments.settings import Table1Settings
from shadowlab.experiments.table_images import table1_work
from shadowlab.models import default_device
from shadowlab.tables import markdown_table

PROCEDURES = ("exhaustive", "pruned")
# budgets: the paper's, a CPU indication in minutes, and a smoke test in seconds
SIZES: dict[str, dict[str, Any]] = {
    "paper": {}, "cpu": {"steps": 40, "noise_samples": 32, "n": 1000},
    "quick": {"steps": 6, "noise_samples": 8, "n": 500, "n_select": 100}}
FIRST = 900


def procedures(size: str = "paper", **changes: Any) -> dict[str, Table1Settings]:
    """The two searches at budget ``size`` (``SIZES``) on the committed subset without controls; ``changes`` apply
    to the pruned one only (e.g. keep_targets, early_stop_margin)."""
    budget = {**SIZES[validate.choice(size, "size", tuple(SIZES))], "controls": False, "source": "subset"}
    return {"exhaustive": Table1Settings.paper(**budget),
            "pruned": Table1Settings.paper_pruned(**budget).replace(**changes)}


def held_out(sigma_index: int, per_sigma: int, first: int = FIRST) -> list[int]:
    """The held-out subset images of the sigma_index-th sigma: per_sigma of them from first + per_sigma * k."""
    start = first + per_sigma * sigma_index
    return list(range(start, start + per_sigma))


def run(out: str | Path, sigmas: Sequence[float], per_sigma: int = 3, first: int = FIRST, size: str = "paper",
        only: Sequence[str] | None = None, device: str | torch.device | None = None, progress: bool = True,
        **changes: Any) -> None:
    """Run (or resume) both searches on the held-out images of every sigma, one record file per (procedure, sigma)
    under ``out`` (``<procedure>-sigma<s>.jsonl``, records of ``table1_work``); only: a subset of PROCEDURES."""
    validate.count(per_sigma, "per_sigma")
    dev = torch.device(device) if device is not None else default_device()
    x_all, y_all, _ = load_cifar10("test", n=first + per_sigma * len(sigmas), source="subset")
    x_all, y_all = x_all.to(dev), y_all.to(dev)
    for name, s in procedures(size, **changes).items():
        if only and name not in only:
            continue
        for k, sigma in enumerate(sigmas):
            model, meta = checkpoints.load(s.model_name(sigma), device=dev)
            work = table1_work(model, sigma, x_all, y_all, s)
            settings = {"procedure": name, "sigma": sigma, "model_sha256": meta["sha256"], "device_type": dev.type,
                        "settings": s.replace(sigmas=(sigma,)).to_dict()}
            run_images(held_out(k, per_sigma, first), work, Path(out) / f"{name}-sigma{sigma:.2f}.jsonl", settings,
                       resume=True, chunk=1, progress=progress, desc=f"{name}, sigma {sigma}")


def _records(path: Path) -> dict[int, dict[str, Any]]:
    lines = path.read_text().splitlines()[1:] if path.exists() else []
    return {r["idx"]: r for r in map(json.loads, lines)}


def compare(out: str | Path, sigmas: Sequence[float], channels: Sequence[int] = (1, 3)) -> list[dict[str, Any]]:
    """One row per (sigma, image, channel mode) that both searches have finished under ``out``: each one's success,
    spoofed radius, SSIM, target and seconds per image, and the pruned search's steps run."""
    rows: list[dict[str, Any]] = []
    for sigma in sigmas:
        recs = {name: _records(Path(out) / f"{name}-sigma{sigma:.2f}.jsonl") for name in PROCEDURES}
        for idx in sorted(set(recs["exhaustive"]) & set(recs["pruned"])):
            ex, pr = recs["exhaustive"][idx], recs["pruned"][idx]
            for ch in channels:
                e, p = ex[f"ch{ch}"], pr[f"ch{ch}"]
                rows.append({"sigma": sigma, "image": idx, "channels": ch, "success_exhaustive": e["success"],
                             "success_pruned": p["success"], "radius_exhaustive": e["spoofed_radius"],
                             "radius_pruned": p["spoofed_radius"], "ssim_exhaustive": e["ssim"],
                             "ssim_pruned": p["ssim"], "target_exhaustive": e["target"], "target_pruned": p["target"],
                             "steps_pruned": p["steps_run"], "seconds_exhaustive": ex["seconds"],
                             "seconds_pruned": pr["seconds"]})
    return rows


def agreement(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the pruned search loses: pairs compared, verdicts that agree, successes lost and gained, and over the
    pairs both searches win the mean spoofed radii and their ratio (pruned / exhaustive)."""
    both = [r for r in rows if r["success_exhaustive"] and r["success_pruned"]]
    mean = lambda v: sum(v) / len(v) if v else None   # noqa: E731 - a one-line helper
    re_, rp = mean([r["radius_exhaustive"] for r in both]), mean([r["radius_pruned"] for r in both])
    return {"pairs": len(rows), "agree": sum(r["success_exhaustive"] == r["success_pruned"] for r in rows),
            "lost": sum(r["success_exhaustive"] and not r["success_pruned"] for r in rows),
            "gained": sum(r["success_pruned"] and not r["success_exhaustive"] for r in rows),
            "mean_radius_exhaustive": re_, "mean_radius_pruned": rp,
            "radius_ratio": rp / re_ if re_ and rp is not None else None}


def summary(out: str | Path, sigmas: Sequence[float]) -> str:
    """The comparison of what is finished under ``out`` as Markdown (per-pair table and the agreement line); also
    writes ``out/summary.json`` (rows and ``agreement``)."""
    rows = compare(out, sigmas)
    agree = agreement(rows)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "summary.json").write_text(json.dumps({"rows": rows, "agreement": agree}, indent=1) + "\n")
    if not rows:
        return "no image finished by both procedures yet"
    cols = [("sigma", "sigma", "2"), ("image", "image", "int"), ("ch", "channels", "int"),
            ("success, exhaustive", "success_exhaustive", "str"), ("success, pruned", "success_pruned", "str"),
            ("spoofed radius, exhaustive", "radius_exhaustive", "3"), ("spoofed radius, pruned", "radius_pruned", "3"),
            ("SSIM, exhaustive", "ssim_exhaustive", "3"), ("SSIM, pruned", "ssim_pruned", "3"),
            ("steps, pruned", "steps_pruned", "int"),
            ("s/image, exhaustive", "seconds_exhaustive", "0"), ("s/image, pruned", "seconds_pruned", "0")]
    ratio = agree["radius_ratio"]
    return (markdown_table(cols, rows) + f"\n\n{agree['pairs']} (image, mode) pairs: the verdicts agree on "
            f"{agree['agree']}; the pruned search loses {agree['lost']} success(es) of the exhaustive one and gains "
            f"{agree['gained']}" + (f"; where both succeed its mean spoofed radius is {ratio:.2f}x the exhaustive "
                                    "one's." if ratio is not None else "."))


__all__ = ["FIRST", "PROCEDURES", "SIZES", "agreement", "compare", "held_out", "procedures", "run", "summary"]
