"""Does the pruned Table 1 search lose anything? The exhaustive search at the paper's settings (every wrong target,
no early stop) against the pruned one ``reproduce table1 --paper --pruned`` runs, on held-out test images, both
judged by the table's CERTIFY (``shadowlab.experiments.pruning``).

    python scripts/table1_pruning.py run                      # the paper's settings: the exhaustive search is hours
    python scripts/table1_pruning.py run --size cpu           # CPU size (40 steps, 32 noise copies): minutes
    python scripts/table1_pruning.py run --quick              # 1 image per sigma, tiny settings: a minute
    python scripts/table1_pruning.py summary [--size cpu]     # the Markdown table of what is done

Every (procedure, sigma) is a resumable record file under --out: the same command goes on where a run stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from shadowlab.experiments import pruning
from shadowlab.experiments.settings import SIGMAS

OUT = "data/results/paper/table1-pruning"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "summary"])
    p.add_argument("--first", type=int, default=pruning.FIRST,
                   help=f"first held-out subset image (default {pruning.FIRST})")
    p.add_argument("--per-sigma", type=int, default=3, help="held-out images per sigma (default 3)")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    p.add_argument("--keep-targets", type=int, default=None,
                   help="targets the pruned search keeps (default: Table1Settings.paper_pruned's)")
    p.add_argument("--early-stop-margin", type=float, default=None,
                   help="the pruned search's early stop (default: Table1Settings.paper_pruned's)")
    p.add_argument("--only", nargs="+", choices=list(pruning.PROCEDURES), default=None)
    p.add_argument("--size", choices=list(pruning.SIZES), default="paper",
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
    changes = {k: v for k, v in (("keep_targets", a.keep_targets), ("early_stop_margin", a.early_stop_margin))
               if v is not None}
    if a.what == "run":
        pruning.run(a.out, a.sigmas, a.per_sigma, a.first, a.size, a.only, **changes)
    print(pruning.summary(a.out, a.sigmas))


if __name__ == "__main__":
    main()
