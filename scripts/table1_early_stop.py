"""Where would an early stop halt a paper-settings Table 1 candidate, and what would it have then? One run of the
pruned search without a stop (300 steps, 400 noise copies, one target kept) per held-out image and channel mode
records each step's share of training noise on the target, SSIM and total objective (``run``); ``summary`` replays
the stop rules on those traces: a margin on the share (with SSIM >= 0.9) and the settle rule (relative fall of the
objective over 10 steps below a tolerance), giving per rule the step it stops at, the best iterate it keeps (share,
SSIM) and the mean steps; the kept iterate is what the loop's early stop would return (``shadow.optimise``).

    python scripts/table1_early_stop.py run --sigma 0.25 --images 900 901 902     # about 30 min on 2 cores
    python scripts/table1_early_stop.py summary

Traces go to --out (one JSON per sigma, merged by image and mode). Held-out images only (subset 900 onwards).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from shadowlab import checkpoints
from shadowlab.data import load_cifar10
from shadowlab.experiments.settings import Table1Settings
from shadowlab.perception import MIN_SSIM
from shadowlab.shadow.attack import attack_smoothing
from shadowlab.tables import markdown_table

OUT = "data/results/paper/table1-early-stop"
MARGINS = (0.95, 0.97, 0.98, 0.99)
SETTLE_TOLS = (0.01, 0.03, 0.05, 0.07)
WINDOW = 10


def run(a: argparse.Namespace) -> None:
    s = Table1Settings.paper_pruned(early_stop_margin=None, prune_step=a.prune_step)
    x, y, _ = load_cifar10("test", n=max(a.images) + 1, source="subset")
    x, y = x[a.images], y[a.images]
    model, _ = checkpoints.load(s.model_name(a.sigma))
    path = Path(a.out) / f"sigma{a.sigma:.2f}.json"
    traces = json.loads(path.read_text())["traces"] if path.exists() else []
    for ch in s.channels:
        r = attack_smoothing(model, a.sigma, x, y, s.shadow_config(ch), n0=s.n0, n_select=s.n_select, n=None,
                             progress=True, image_ids=a.images)
        pc, kept = r.history["per_candidate"], r.history["kept"]
        for i, idx in enumerate(a.images):
            j = int(kept[i].nonzero()[0])
            traces = [t for t in traces if (t["image"], t["channels"]) != (idx, ch)]
            traces.append({"image": idx, "channels": ch, "target_column": j,
                           **{k: [round(float(v), 6) for v in pc[name][:, i, j]] for k, name in
                              (("share", "target_fraction"), ("ssim", "ssim"), ("total", "total"))}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sigma": a.sigma, "prune_step": a.prune_step, "settings": s.to_dict(),
                                "traces": sorted(traces, key=lambda t: (t["image"], t["channels"]))}) + "\n")


def _stop(t: dict[str, Any], margin: float | None, tol: float | None) -> int:
    """The step the loop's early stop freezes the candidate at (the last step when it never does)."""
    share, sim, total = (torch.tensor(t[k]) for k in ("share", "ssim", "total"))
    for k in range(len(share)):
        if margin is not None and share[k] >= margin and sim[k] >= MIN_SSIM:
            return k
        if tol is not None and k >= WINDOW and total[k - WINDOW] - total[k] <= tol * abs(float(total[k - WINDOW])):
            return k
    return len(share) - 1


def _kept(t: dict[str, Any], stop: int) -> tuple[float | None, float | None]:
    """(share, SSIM) of the best iterate up to ``stop``: the largest share among the reached (> 0.5) and
    imperceptible ones, None when there is none (the candidate fails)."""
    share, sim = torch.tensor(t["share"][:stop + 1]), torch.tensor(t["ssim"][:stop + 1])
    ok = (share > 0.5) & (sim >= MIN_SSIM)
    if not bool(ok.any()):
        return None, None
    k = int(torch.where(ok, share, torch.full_like(share, -1.0)).argmax())
    return float(share[k]), float(sim[k])


def summary(a: argparse.Namespace) -> str:
    rules = [("no stop (300 steps)", None, None)] + [(f"share >= {m}", m, None) for m in MARGINS] + \
        [(f"settle, tol {tol}", None, tol) for tol in SETTLE_TOLS]
    rows = []
    for path in sorted(Path(a.out).glob("sigma*.json")):
        data = json.loads(path.read_text())
        for name, margin, tol in rules:
            stops = [_stop(t, margin, tol) for t in data["traces"]]
            kept = [_kept(t, k) for t, k in zip(data["traces"], stops)]
            row = {"sigma": data["sigma"], "rule": name, "mean_steps": sum(k + 1 for k in stops) / len(stops),
                   "successes": sum(s is not None for s, _ in kept)}
            for t, k, (sh, sm) in zip(data["traces"], stops, kept):
                row[f"{t['image']}/ch{t['channels']}"] = (f"{k + 1}: {sh:.3f} / {sm:.3f}" if sh is not None else
                                                          f"{k + 1}: fails")
            rows.append(row)
    Path(a.out, "summary.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    if not rows:
        return "no traces yet"
    keys = [k for k in rows[0] if "/ch" in k]
    cols = [("sigma", "sigma", "2"), ("rule", "rule", "str"), ("mean steps", "mean_steps", "1"),
            ("successes", "successes", "int")] + [(f"{k}: steps: share / SSIM", k, "str") for k in keys]
    return markdown_table(cols, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "summary"])
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--images", type=int, nargs="+", default=[900, 901, 902])
    p.add_argument("--prune-step", type=int, default=5,
                   help="steps on every target before one is kept (default 5, the traces the stop was chosen on)")
    p.add_argument("--out", default=OUT)
    a = p.parse_args()
    if a.what == "run":
        if min(a.images) < 900:
            raise SystemExit("--images: held-out subset images only (900 onwards)")
        run(a)
    print(summary(a))


if __name__ == "__main__":
    main()
