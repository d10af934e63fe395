"""Success against the SSIM threshold (0.85 to 0.99) for committed tables: ``shadowlab.experiments.tradeoff``.

    python scripts/tradeoff.py data/results/paper/table2=default data/results/paper/faithful/table2="authors N=600" \
        --out data/results/paper/tradeoff
"""

from __future__ import annotations

import argparse

from shadowlab.experiments.tradeoff import tradeoff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tables", nargs="+", help="DIR=LABEL, the first is the reference")
    p.add_argument("--out", required=True, help="writes OUT.json and OUT.png")
    a = p.parse_args()
    labelled = [t.split("=", 1) if "=" in t else [t, t] for t in a.tables]   # DIR=LABEL, or DIR as its label
    res = tradeoff({label: d for d, label in labelled}, a.out)
    for g, below in res["reference_below"].items():
        for other, ms in below.items():
            print(f"{g}: {res['reference']} below {other} at min_ssim {ms}" if ms else
                  f"{g}: {res['reference']} at or above {other} everywhere")


if __name__ == "__main__":
    main()
