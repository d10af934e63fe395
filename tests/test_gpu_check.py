"""scripts/gpu-check keeps its promise of at most 8 minutes: its steps' time limits add up to less (read from the
script, so a step added or lengthened without its budget fails here, without a GPU)."""

import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check"


def step_limits(text: str) -> dict[str, int]:
    """{step name: its time limit in seconds, times the loop's repetitions} of every `step NAME SECONDS ...` line."""
    limits: dict[str, int] = {}
    loop = 1
    for line in text.splitlines():
        stripped = line.strip()
        if m := re.match(r"for \w+ in (.+); do", stripped):
            loop = len(m.group(1).split())
        elif stripped == "done":
            loop = 1
        elif m := re.match(r"step (\S+) (\d+) ", stripped):
            limits[m.group(1)] = int(m.group(2)) * loop
    return limits


def test_the_steps_fit_eight_minutes():
    limits = step_limits(SCRIPT.read_text())
    assert {"cuda_tests", "cost_table1", "cost_table2", '"bench_$p"'} <= set(limits), limits
    assert sum(limits.values()) <= 8 * 60, limits


def test_the_reader_counts_a_loop_and_would_catch_an_overrun():
    text = "step a 300 x\nfor p in fp32 bf16; do\n  step b 100 y\ndone\nstep c 10 z\n"
    assert step_limits(text) == {"a": 300, "b": 200, "c": 10} and sum(step_limits(text).values()) > 480
