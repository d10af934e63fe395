"""The host allocator: with keep_freed_memory a freed batch's memory is reused, so allocating it again faults no
pages in (counted by the kernel, not timed); without it every allocation of a large tensor faults all its pages."""

import os
import subprocess
import sys

import pytest

from shadowlab import allocator

# a child process, so that the test process's allocator is left as it is: 20 allocations of a 64 MiB tensor, each
# written whole and freed; prints whether keep_freed_memory is in effect and the minor page faults of the last 10
# (the heap settles in the first few)
CHILD = """
import resource, torch
from shadowlab import allocator
on = allocator.keep_freed_memory()
for _ in range(10):
    torch.ones(16 * 2**20).sum()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 2**20).sum()
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def faults(keep: str) -> tuple[bool, int]:
    # glibc's own settings out of the way (the Makefile exports MALLOC_*_THRESHOLD_ for its runs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update({allocator.ENV: keep, "OMP_NUM_THREADS": "1"})
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    on, n = out.stdout.split()
    return on == "True", int(n)


@pytest.mark.skipif(not allocator.GLIBC, reason="glibc's mallopt only")
def test_freed_memory_is_reused_without_page_faults():
    pages = 10 * 64 * 2**20 // 4096   # the pages of 10 fresh 64 MiB blocks
    on, kept = faults("1")
    off, default = faults("0")
    assert on and not off
    assert default > pages // 2     # glibc's default maps every block afresh: this count is what the setting removes
    assert kept < pages // 100


def test_it_is_off_where_the_environment_says_so(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv(allocator.ENV, "0")
    assert allocator.keep_freed_memory() is False and allocator.keeps_freed_memory() is False
