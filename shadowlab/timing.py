"""Timing helpers of the benchmarks: device synchronisation, interleaved best-of-N wall times, the machine."""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shadowlab.allocator import keeps_freed_memory
from shadowlab.models import default_device


def synchronize(device: torch.device) -> None:
    """Wait for the device to finish its queued work (CUDA), so that a timing measures it; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Synchronised wall time in seconds of one call of fn(), with what it returned."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def timed_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeat: int = 3,
                      warmup: int = 1) -> dict[str, float]:
    """Best wall time of each fn() in seconds over `repeat` rounds, each round running every fn in turn, so that
    load from other processes reaches all of them alike; the minimum, because outside load only adds time."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = {k: math.inf for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            best[k] = min(best[k], timed_call(fn, device)[0])
    return best


def machine() -> dict[str, Any]:
    """The machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(default_device()), "torch": torch.__version__, "python": platform.python_version(),
            "keeps_freed_memory": keeps_freed_memory()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import art  # optional dependency (adversarial-robustness-toolbox)
        info["art"] = art.__version__
    except ImportError:
        info["art"] = None
    return info
