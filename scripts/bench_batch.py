"""What the forward chunk and the thread layout cost on this machine: the base network's forward pass per sample
(CERTIFY's work) at several chunks, the smoothing attack's class step per candidate (400 noise copies, forward and
input gradient) at several chunks, both timed interleaved (``timing.timed_interleaved``: best of --repeat), and the
forward throughput of one process with every thread against one single-thread process per core side by side (the
layout of ``OMP_NUM_THREADS=1 torchrun --nproc_per_node <cores>``).

    python scripts/bench_batch.py                     # smooth-sigma0.25 on this machine's CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from shadowlab import checkpoints
from shadowlab.certify.smoothing import Smooth
from shadowlab.data import load_cifar10
from shadowlab.experiments.settings import Table1Settings
from shadowlab.models import fold_batch_norm
from shadowlab.shadow.inputs import Candidates
from shadowlab.shadow.objectives import SmoothingObjective
from shadowlab.timing import timed_interleaved

CHUNKS = (1000, 512, 256, 128)


def forward_ms(model_name: str, chunk: int, threads: int, repeat: int) -> float:
    """Milliseconds per sample of the folded base network's forward pass (argmax) at ``chunk`` on ``threads``."""
    torch.set_num_threads(threads)
    model, _ = checkpoints.load(model_name, device="cpu")
    net = fold_batch_norm(model.eval())
    x = torch.rand(chunk, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)

    def fwd() -> None:
        with torch.inference_mode():
            net(x).argmax(1)

    return 1e3 * timed_interleaved({"f": fwd}, torch.device("cpu"), repeat=repeat, warmup=2)["f"] / chunk


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smooth-sigma0.25")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--child", nargs=2, type=int, default=None, help=argparse.SUPPRESS)   # chunk threads
    a = p.parse_args()
    if a.child:
        print(json.dumps(forward_ms(a.model, a.child[0], a.child[1], a.repeat)))
        return
    model, meta = checkpoints.load(a.model, device="cpu")
    sigma = meta["defense_parameter"]["sigma"]
    x, y, _ = load_cifar10("test", n=1, source="subset")
    smooth = Smooth(model, 10, sigma, device="cpu")
    certify = {c: (lambda c=c: smooth.certify(x, 100, 5000, 0.001, batch_size=c)) for c in CHUNKS}
    t = timed_interleaved(certify, torch.device("cpu"), repeat=a.repeat, warmup=1)
    print("CERTIFY of one image, ms per sample:", {c: round(1e3 * v / 5100, 3) for c, v in t.items()})
    cands = Candidates(x, y, torch.tensor([[(int(y[0]) + 1) % 10]]), torch.zeros(1, dtype=torch.long),
                       torch.tensor([0]))
    cfg = Table1Settings.paper_pruned().shadow_config(1)
    steps = {}
    for c in (1024, 400, 256, 200, 100):
        step = SmoothingObjective(smooth, batch_size=c).class_step(cands, cfg)
        steps[c] = (lambda step=step: step(torch.zeros(1, 1, 32, 32), torch.tensor([0])))
    t = timed_interleaved(steps, torch.device("cpu"), repeat=a.repeat, warmup=1)
    print("attack class step of one candidate (400 copies), s:", {c: round(v, 3) for c, v in t.items()})
    cores = os.cpu_count() or 1
    one = forward_ms(a.model, 256, cores, a.repeat)
    cmd = [sys.executable, __file__, "--model", a.model, "--repeat", str(a.repeat), "--child", "256", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(cores)]
    each = [json.loads(pr.communicate()[0]) for pr in procs]
    print(f"forward at chunk 256: one process on {cores} threads {one:.3f} ms per sample; {cores} single-thread "
          f"processes side by side {', '.join(f'{v:.3f}' for v in each)} ms each, "
          f"{1 / sum(1 / v for v in each):.3f} ms per sample together")


if __name__ == "__main__":
    main()
