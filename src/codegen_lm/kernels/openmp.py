"""Handing back a thread's OpenMP worker pools before another thread takes over the computing.

GNU OpenMP (libgomp: PyTorch bundles one copy, numba's `omp` threading layer loads the system's) keeps
a pool of worker threads for every thread that has started a parallel region, for the life of that
thread. Its workers spin for a while after each region, so the next region starts at once, but only
while the process's pools hold no more threads than there are CPUs; past that, every worker sleeps
after a region and each region pays a futex wake-up. On a 2-core machine, a main thread that loaded
the model (and so owns a pool) plus an engine loop in a second thread is past that limit: measured on
an AMD EPYC (2 cores), the loop decoded 2-2.5x slower than the same engine driven from the main
thread. The main thread's pools are idle then, so it hands them back (OpenMP 5's
`omp_pause_resource_all`, which libgomp implements as "free the calling thread's pool") before the
loop starts. They come back if that thread runs a parallel region again.
"""

from __future__ import annotations

import ctypes
import os

OMP_PAUSE_SOFT = 1


def gnu_openmp_runtimes() -> list[str]:
    """Paths of the libgomp copies loaded in this process (none where /proc is missing)."""
    paths: set[str] = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith("libgomp"):
                    paths.add(parts[5].strip())
    except OSError:
        return []
    return sorted(paths)


def release_thread_pools() -> int:
    """Free the calling thread's worker pools in every loaded libgomp; returns how many were asked.

    Call it from a thread that stops computing (it must not be inside a parallel region). Only GNU
    OpenMP is touched: LLVM's and Intel's runtimes read a pause as "shut the whole runtime down"."""
    asked = 0
    for path in gnu_openmp_runtimes():
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):  # unloadable, or a libgomp older than OpenMP 5 (GCC < 9)
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        if pause(OMP_PAUSE_SOFT) == 0:
            asked += 1
    return asked
