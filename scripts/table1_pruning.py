"""Does a faster Table 1 search lose anything? The exhaustive Shadow Attack search of Table 1 at the paper's settings
(every wrong target, no early stop) against a pruned one (``--keep-targets`` after ``prune_step``, optionally an
early stop), on held-out test images, both judged by the table's CERTIFY. Per image and channel mode it reports
whether each succeeds (a wrong label certified, SSIM >= min) and its spoofed radius.

    python scripts/table1_pruning.py run                      # the paper's settings: the exhaustive search is hours
    python scripts/table1_pruning.py run --size cpu           # CPU size (40 steps, 32 noise copies): minutes
    python scripts/table1_pruning.py run --quick              # 4 images, tiny settings: a minute
    python scripts/table1_pruning.py summary [--size cpu]     # the Markdown table of what is done

Held-out images: subset images ``--first`` (900) onwards, 3 per sigma by default (sigma k takes the k-th three), which
no committed table or lesson reports. Each (procedure, sigma) is one resumable record file
(``experiments.runs.run_images``) under ``--out``: a run killed or cut by the end of a session goes on where it
stopped with the same command, and a GPU can take over the rest. The controls are not run (they do not depend on
the search).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from shadowlab import checkpoints
from shadowlab.data import load_cifar10
from shadowlab.experiments.runs import run_images
from shadowlab.experiments.settings import SIGMAS, Table1Settings
from shadowlab.experiments.table_images import table1_work
from shadowlab.models import default_device
from shadowlab.tables import markdown_table

OUT = "data/results/paper/table1-pruning"


SIZES = {"paper": {}, "cpu": {"steps": 40, "noise_samples": 32, "n": 1000},
         "quick": {"steps": 6, "noise_samples": 8, "n": 500, "n_select": 100}}


def procedures(a: argparse.Namespace) -> dict[str, tuple[Table1Settings, dict[str, Any]]]:
    """The exhaustive search (the paper's: every target, no early stop) and the pruned one (``--keep-targets``
    after the prune step, and a candidate stops once ``--early-stop-margin`` of its training noise is on the
    target, with no settle rule, ``ShadowConfig.settle_window``), each with its ShadowConfig changes, at --size."""
    base = Table1Settings.paper(controls=False, source="subset", **SIZES[a.size])
    pruned = base.replace(keep_targets=a.keep_targets, early_stop_margin=a.early_stop_margin,
                          early_stop_scope="candidate")
    return {"exhaustive": (base, {}), "pruned": (pruned, {"settle_window": None})}


def run(a: argparse.Namespace) -> None:
    dev = default_device()
    per = a.per_sigma
    x_all, y_all, _ = load_cifar10("test", n=a.first + per * len(a.sigmas), source="subset")
    for name, (s, changes) in procedures(a).items():
        if a.only and name not in a.only:
            continue
        for k, sigma in enumerate(a.sigmas):
            ids = list(range(a.first + per * k, a.first + per * (k + 1)))
            model, meta = checkpoints.load(s.model_name(sigma), device=dev)
            configs = {ch: s.shadow_config(ch, **changes) for ch in s.channels}
            x, y = x_all.to(dev), y_all.to(dev)
            work = table1_work(model, sigma, x, y, configs, s.n0, s.n_select, s.n, s.alpha, s.seed, controls=False)
            settings = {"procedure": name, "sigma": sigma, "model_sha256": meta["sha256"], "device_type": dev.type,
                        "config": {ch: c.to_dict() for ch, c in configs.items()}, "n": s.n, "n0": s.n0,
                        "n_select": s.n_select, "alpha": s.alpha}
            run_images(ids, work, Path(a.out) / f"{name}-sigma{sigma:.2f}.jsonl", settings, resume=True, chunk=1,
                       desc=f"{name}, sigma {sigma}")


def summary(a: argparse.Namespace) -> str:
    """Per (sigma, image, channel mode) the two procedures' success and spoofed radius, for the images both have
    finished; writes the JSON to --out/summary.json and returns the Markdown table with the agreement line."""
    rows: list[dict[str, Any]] = []
    for sigma in a.sigmas:
        recs = {}
        for name in ("exhaustive", "pruned"):
            path = Path(a.out) / f"{name}-sigma{sigma:.2f}.jsonl"
            lines = path.read_text().splitlines()[1:] if path.exists() else []
            recs[name] = {r["idx"]: r for r in map(json.loads, lines)}
        for idx in sorted(set(recs["exhaustive"]) & set(recs["pruned"])):
            for ch in (1, 3):
                e, p = recs["exhaustive"][idx][f"ch{ch}"], recs["pruned"][idx][f"ch{ch}"]
                rows.append({"sigma": sigma, "image": idx, "channels": ch, "success_exhaustive": e["success"],
                             "success_pruned": p["success"], "radius_exhaustive": e["spoofed_radius"],
                             "radius_pruned": p["spoofed_radius"], "target_exhaustive": e["target"],
                             "target_pruned": p["target"], "seconds_exhaustive": recs["exhaustive"][idx]["seconds"],
                             "seconds_pruned": recs["pruned"][idx]["seconds"]})
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "summary.json").write_text(json.dumps({"rows": rows}, indent=1))
    if not rows:
        return "no image finished by both procedures yet"
    cols = [("sigma", "sigma", "2"), ("image", "image", "int"), ("ch", "channels", "int"),
            ("success, exhaustive", "success_exhaustive", "str"), ("success, pruned", "success_pruned", "str"),
            ("spoofed radius, exhaustive", "radius_exhaustive", "3"), ("spoofed radius, pruned", "radius_pruned", "3"),
            ("s/image, exhaustive", "seconds_exhaustive", "0"), ("s/image, pruned", "seconds_pruned", "0")]
    same = sum(r["success_exhaustive"] == r["success_pruned"] for r in rows)
    lost = sum(r["success_exhaustive"] and not r["success_pruned"] for r in rows)
    return (markdown_table(cols, rows) + f"\n\n{len(rows)} (image, mode) pairs: the verdicts agree on {same}, the "
            f"pruned search loses {lost} success(es) of the exhaustive one.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "summary"])
    p.add_argument("--first", type=int, default=900, help="first held-out subset image (default 900)")
    p.add_argument("--per-sigma", type=int, default=3, help="held-out images per sigma (default 3)")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    p.add_argument("--keep-targets", type=int, default=1, help="targets the pruned search keeps (default 1)")
    p.add_argument("--early-stop-margin", type=float, default=1.0,
                   help="the pruned search stops a candidate once this share of its training noise is on the "
                        "target and it is imperceptible (default 1.0: its best iterate cannot change after that)")
    p.add_argument("--only", nargs="+", choices=["exhaustive", "pruned"], default=None)
    p.add_argument("--size", choices=list(SIZES), default="paper",
                   help="paper (default: 300 steps, 400 noise copies, n = 100,000), cpu (40 steps, 32 copies, "
                        "n = 1,000: an indication in minutes) or quick")
    p.add_argument("--quick", action="store_true", help="--size quick, 1 image per sigma (a minute)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help=f"record folder (default {OUT}, or a temporary one with --quick)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.per_sigma, a.size = 1, "quick"
    a.out = a.out or (str(Path("/tmp") / "table1-pruning-quick") if a.quick else
                      OUT if a.size == "paper" else f"{OUT}-{a.size}")
    if a.what == "run":
        run(a)
    print(summary(a))


if __name__ == "__main__":
    main()
