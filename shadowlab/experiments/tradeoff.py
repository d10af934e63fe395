"""Success against the imperceptibility threshold: the trade-off curve of a reproduced table (issue 38).

A table counts a shadow image as a success when its wrong label is certified AND SSIM(shadow, natural) >= min_ssim
(``perception.shadow_success``). One threshold hides how the attacks trade certificates for visibility, so this
module reads the per-image records of one or more committed tables and counts, per model (or sigma) and threshold,
the images whose kept shadow is certified with SSIM >= the threshold.

The curve is read off each image's *kept* shadow: every run chose it at its own min_ssim (0.9 by default), so at
another threshold a run might have kept another candidate; the curve is then a lower bound of what a rerun at that
threshold would find, for every run alike.

    python scripts/tradeoff.py data/results/paper/table2=default data/results/paper/faithful/table2="authors N=600" \
        --out data/results/paper/tradeoff
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLDS = tuple(round(0.85 + 0.01 * i, 2) for i in range(15))   # 0.85 .. 0.99


def load_per_image(table_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """(group key, per-image rows) of a committed table folder holding table1.json or table2.json. When the folder
    holds a ``rejudge.json`` with one verdict per row (``experiments.rejudge``), each row's "spoofed" is that
    re-judged verdict, so runs whose own verdicts differ (the authors' IBP on the unquantised iterate) are read by
    one judge. ValueError naming table_dir when neither table is there."""
    d = Path(table_dir)
    for name, key in (("table2.json", "model"), ("table1.json", "sigma")):
        if (d / name).is_file():
            rows = json.loads((d / name).read_text())["per_image"]
            again = json.loads((d / "rejudge.json").read_text()) if (d / "rejudge.json").is_file() else {}
            verdicts = again.get("rejudged_spoofed")
            if verdicts is not None and len(verdicts) == len(rows):
                rows = [{**r, "spoofed": bool(v)} for r, v in zip(rows, verdicts)]
            return key, rows
    raise ValueError(f"table_dir={str(d)!r} holds no table1.json or table2.json")


def success_curve(rows: Sequence[Mapping[str, Any]], group_key: str,
                  thresholds: Sequence[float] = THRESHOLDS) -> dict[str, list[float]]:
    """Per group (model or sigma, and channel mode where rows have one), the share of images whose kept shadow is
    certified (``spoofed``) with SSIM >= each threshold. Shapes: one list of len(thresholds) per group."""
    groups: dict[str, list[tuple[bool, float]]] = {}
    for r in rows:
        g = str(r[group_key]) + (f", {r['channels']}-channel" if "channels" in r else "")
        groups.setdefault(g, []).append((bool(r["spoofed"]), float(r["ssim"])))
    return {g: [sum(s and q >= m for s, q in v) / len(v) for m in thresholds] for g, v in groups.items()}


def tradeoff(tables: Mapping[str, str | Path], out: str | Path | None = None,
             thresholds: Sequence[float] = THRESHOLDS) -> dict[str, Any]:
    """The curves of several runs (label -> table folder) on the same groups and the images all of them hold, with,
    per group, the thresholds where the first run's curve lies below another's. Writes ``out``.json and ``out``.png
    when out is given."""
    loaded = {label: load_per_image(d) for label, d in tables.items()}
    # the same images in every run: the indices all of them hold (a 100-image run beside a 50-image one: the 50)
    common = set.intersection(*({r.get("index") for r in rows} for _, rows in loaded.values()))
    curves: dict[str, dict[str, list[float]]] = {}
    for label, (key, rows) in loaded.items():
        curves[label] = success_curve([r for r in rows if r.get("index") in common], key, thresholds)
    first, *others = list(curves)
    below = {g: {o: [m for m, a, b in zip(thresholds, c, curves[o].get(g, [])) if a < b] for o in others}
             for g, c in curves[first].items()}
    result = {"thresholds": list(thresholds), "images": len(common),
              "tables": {k: str(v) for k, v in tables.items()}, "curves": curves, "reference": first,
              "reference_below": below,
              "note": "success = kept shadow certified (re-judged where the table has a rejudge.json) and SSIM >= "
                      "threshold, read off each image's kept shadow (chosen at the run's own min_ssim): a lower "
                      "bound at other thresholds"}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        plot_tradeoff(result).savefig(out.with_suffix(".png"), dpi=90, bbox_inches="tight")
    return result


def plot_tradeoff(result: Mapping[str, Any]) -> Any:
    """One panel per group: success against the SSIM threshold, one line per run."""
    import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot; the curves need no plotting library)

    groups = list(next(iter(result["curves"].values())))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.2), squeeze=False, sharey=True)
    for ax, g in zip(axes[0], groups):
        for label, c in result["curves"].items():
            if g in c:
                ax.plot(result["thresholds"], 100 * np.asarray(c[g]), marker=".", label=label)
        ax.set_title(g, fontsize=9)
        ax.set_xlabel("min SSIM")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("success (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


__all__: Sequence[str] = ("THRESHOLDS", "load_per_image", "plot_tradeoff", "success_curve", "tradeoff")
