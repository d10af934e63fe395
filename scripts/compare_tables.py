"""Compare two Table 2 runs image by image, on the images both ran (e.g. the paper's settings against the CPU-size
run):

    python scripts/compare_tables.py data/results/table2 data/results/paper/table2 [--names 40-step 300-step]

Per model: the images in common, each run's success (certified wrong label AND SSIM >= min_ssim) and spoof rate
on them, the images only one run succeeds on, the successes whose shadow is the natural image (L2 of the 8-bit
difference below 0.1) and the median L2 of the successes. Reads the per-image CSVs the tables write.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from shadowlab.tables import markdown_table


def per_image(folder: Path) -> dict[tuple[str, int], dict[str, str]]:
    """(model, image index) -> the per-image row of a Table 2 folder (table2_per_image.csv)."""
    with (folder / "table2_per_image.csv").open() as f:
        return {(r["model"], int(r["index"])): r for r in csv.DictReader(f)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--names", nargs=2, default=["first", "second"])
    a = p.parse_args()
    one, two = per_image(a.first), per_image(a.second)
    common = sorted(set(one) & set(two))
    yes = lambda r, k: r[k] in ("True", "true", "1")
    first, second = a.names
    cols = [("model", "model", "str"), ("images", "images", "int"), (f"success {first}", "s1", "pct"),
            (f"success {second}", "s2", "pct"), (f"spoof {first}", "p1", "pct"), (f"spoof {second}", "p2", "pct"),
            (f"only {first}", "only1", "int"), (f"only {second}", "only2", "int"),
            (f"{second} successes with L2 < 0.1", "tiny", "int"), (f"median L2 of {second} successes", "l2", "2")]
    rows = []
    for model in sorted({m for m, _ in common}):
        keys = [k for k in common if k[0] == model]
        s1 = [yes(one[k], "success") for k in keys]
        s2 = [yes(two[k], "success") for k in keys]
        p1 = [yes(one[k], "spoofed") for k in keys]
        p2 = [yes(two[k], "spoofed") for k in keys]
        l2 = [float(two[k]["l2"]) for k, s in zip(keys, s2) if s]
        share = lambda v: sum(v) / len(v)
        rows.append({"model": model, "images": len(keys), "s1": share(s1), "s2": share(s2), "p1": share(p1),
                     "p2": share(p2), "only1": sum(x and not y for x, y in zip(s1, s2)),
                     "only2": sum(y and not x for x, y in zip(s1, s2)), "tiny": sum(v < 0.1 for v in l2),
                     "l2": statistics.median(l2) if l2 else float("nan")})
    print(markdown_table(cols, rows))


if __name__ == "__main__":
    main()
