"""The host allocator of a CPU run. glibc's malloc hands every large freed block back to the system (munmap) and maps a
fresh one at the next allocation, so each forward and backward pass over a batch faults its activations in again,
page by page: on the 2-core reference machine 50,000 to 100,000 faults a second, 12-16% of a CPU run's time spent in
the kernel (docs/results.md). ``keep_freed_memory`` asks glibc to serve every block from its heap and keep freed
memory for reuse (``mallopt``: M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 1 GiB). Nothing computed changes, only where
tensors live.

Written by hand (ctypes, a few lines) because torch has no switch for a caching CPU allocator, jemalloc and
tcmalloc are not installable as Python packages here, and ``GLIBC_TUNABLES`` does the same only when it is set
before the process starts.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

ENV = "SHADOWLAB_KEEP_FREED_MEMORY"   # "0" leaves glibc's defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # glibc's <malloc.h>
TRIM_THRESHOLD = 1 << 30               # bytes of free heap top kept before any is returned (a C int)

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"   # where mallopt exists
_applied = False


def keep_freed_memory() -> bool:
    """Make this process's glibc malloc keep freed memory for reuse (module docstring). Process-wide and
    idempotent; the command line calls it at start. Returns True where it is in effect: Linux with glibc and
    ``$SHADOWLAB_KEEP_FREED_MEMORY`` not "0"; elsewhere it changes nothing and returns False. The resident memory
    stays near the run's peak instead of shrinking between batches."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "1") == "0" or not GLIBC:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied


def keeps_freed_memory() -> bool:
    """Whether ``keep_freed_memory`` is in effect in this process (recorded with the timings)."""
    return _applied
