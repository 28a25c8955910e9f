"""`use_one_openmp_thread`: a helper thread's torch ops on the CPU without an OpenMP team of their own.

Every thread that runs a parallel torch op becomes the master of its own OpenMP team, whose worker
threads live as long as that thread does. libgomp counts all of them, and once a process has more
than there are CPUs it stops letting idle workers spin (GOMP_SPINCOUNT then no longer applies):
every parallel region of every thread pays to wake its workers. Measured on the 2-core CPU
(bench/RESULTS.md, "MoE dispatch"): once the runner's micro-batch helper thread (two micro-batches)
had run one step, the colocated engine in the same process decoded at ~380 tokens/s at batch 128
instead of ~1,050, until that thread ended. The helper's team size is per thread (the OpenMP
`nthreads-var` of the calling thread): set to 1, it makes no team, and the process's other threads
keep theirs. PyTorch's `torch.set_num_threads` would not do: it also sets MKL's threads for the
whole process.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

log = logging.getLogger(__name__)

OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")


@functools.cache
def _runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes loaded in this process (torch's bundled copy, and any other)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:  # not Linux
        return ()
    found = []
    for path in sorted(paths):
        if os.path.basename(path).startswith(OPENMP_RUNTIMES):
            lib = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
            if hasattr(lib, "omp_set_num_threads"):
                found.append(lib)
    return tuple(found)


def use_one_openmp_thread() -> None:
    """Make the calling thread's parallel regions run on that thread alone (no OpenMP team)."""
    runtimes = _runtimes()
    if not runtimes:
        log.debug("no OpenMP runtime loaded: nothing to limit")
    for lib in runtimes:
        lib.omp_set_num_threads(1)
