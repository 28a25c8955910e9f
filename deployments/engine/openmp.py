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
whole process. threadpoolctl finds the OpenMP runtimes the process loaded (torch's bundled libgomp
among them) and sets the calling thread's team size in each.
"""

from __future__ import annotations


def use_one_openmp_thread() -> None:
    """Make the calling thread's parallel regions run on that thread alone (no OpenMP team). Stays
    set for the thread's life (threadpoolctl's limits, not used as a context manager)."""
    from threadpoolctl import threadpool_limits  # here: only CPU engines call it (the GPU image lacks it)

    threadpool_limits(limits=1, user_api="openmp")
