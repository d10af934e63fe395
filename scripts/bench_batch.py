"""What the forward chunk and the thread layout cost on this machine: the base network's forward pass per sample
(CERTIFY's work) at several chunks, the smoothing attack's class step per candidate (400 noise copies, forward and
input gradient) at several chunks, both timed interleaved (``timing.timed_interleaved``: best of --repeat), and the
forward throughput of one process with every thread against one single-thread process per core side by side (the
layout of ``OMP_NUM_THREADS=1 torchrun --nproc_per_node <cores>``).

    python scripts/bench_batch.py                     # smooth-sigma0.25 on this machine's CPU
    python scripts/bench_batch.py --allocator         # glibc's default against allocator.keep_freed_memory

``--allocator`` times CERTIFY (n = 10,000 at chunk 256) and the attack's class step (chunk 256) in fresh processes,
alternately with ``$SHADOWLAB_KEEP_FREED_MEMORY`` 0 and 1, and counts each one's minor page faults and kernel time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from shadowlab import allocator, checkpoints
from shadowlab.certify.smoothing import Smooth
from shadowlab.data import load_cifar10
from shadowlab.experiments.settings import Table1Settings
from shadowlab.models import fold_batch_norm
from shadowlab.shadow.inputs import Candidates
from shadowlab.shadow.objectives import SmoothingObjective
from shadowlab.timing import timed_call, timed_interleaved

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


def allocator_child(model_name: str, repeat: int) -> dict[str, float]:
    """One process's figures for ``--allocator``: best-of-``repeat`` CERTIFY ms per sample and class step seconds,
    with the page faults per second and the kernel's share of CPU time over all of each one's rounds."""
    on = allocator.keep_freed_memory()
    model, meta = checkpoints.load(model_name, device="cpu")
    x, y, _ = load_cifar10("test", n=1, source="subset")
    smooth = Smooth(model, 10, meta["defense_parameter"]["sigma"], device="cpu")
    cands = Candidates(x, y, torch.tensor([[(int(y[0]) + 1) % 10]]), torch.zeros(1, dtype=torch.long),
                       torch.tensor([0]))
    step = SmoothingObjective(smooth, batch_size=256).class_step(cands, Table1Settings.paper_pruned().shadow_config(1))
    fns = {"certify_ms_per_sample": (lambda: smooth.certify(x, 100, 10_000, 0.001, batch_size=256), 1e3 / 10_100),
           "step_s": (lambda: step(torch.zeros(1, 1, 32, 32), torch.tensor([0])), 1.0)}
    out: dict[str, float] = {"keeps_freed_memory": on}
    for name, (fn, scale) in fns.items():
        fn()
        r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        best = min(timed_call(fn, torch.device("cpu"))[0] for _ in range(repeat))
        r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        out[name] = round(best * scale, 4)
        out[name + "_faults_per_s"] = round((r1.ru_minflt - r0.ru_minflt) / (w1 - w0))
        out[name + "_kernel_share"] = round((r1.ru_stime - r0.ru_stime) / cpu, 3)
    return out


def compare_allocators(model_name: str, repeat: int, rounds: int = 3) -> None:
    """Print ``allocator_child``'s figures for glibc's default and for keep_freed_memory, ``rounds`` fresh
    processes each, alternating, and the medians."""
    figures: dict[str, list[dict]] = {"0": [], "1": []}
    for _ in range(rounds):
        for keep in figures:
            cmd = [sys.executable, __file__, "--model", model_name, "--repeat", str(repeat), "--allocator-child"]
            env = {**os.environ, allocator.ENV: keep}
            figures[keep].append(json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True,
                                                           check=True).stdout))
            print("keep_freed_memory" if keep == "1" else "glibc default", json.dumps(figures[keep][-1]), flush=True)
    for key in ("certify_ms_per_sample", "step_s"):
        med = {k: statistics.median(f[key] for f in v) for k, v in figures.items()}
        print(f"{key}: median {med['0']:.4f} (glibc default) -> {med['1']:.4f} (keep_freed_memory), "
              f"{100 * (med['1'] / med['0'] - 1):+.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smooth-sigma0.25")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--child", nargs=2, type=int, default=None, help=argparse.SUPPRESS)   # chunk threads
    p.add_argument("--allocator", action="store_true", help="only compare glibc's default allocator settings with "
                                                           "allocator.keep_freed_memory")
    p.add_argument("--allocator-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.allocator_child:
        print(json.dumps(allocator_child(a.model, a.repeat)))
        return
    if a.allocator:
        compare_allocators(a.model, a.repeat)
        return
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
