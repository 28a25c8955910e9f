"""`use_one_openmp_thread` limits the calling thread's OpenMP team and nobody else's (run in a fresh
interpreter: the team sizes are process state)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = """
import threading, torch
from deployments.engine.openmp import use_one_openmp_thread
torch.set_num_threads(2)
torch.ones(1 << 20).add_(1)  # a parallel region: torch's OpenMP runtime is loaded and in use
seen = {}
def helper():
    seen["before"] = torch.get_num_threads()
    use_one_openmp_thread()
    seen["after"] = torch.get_num_threads()
    torch.ones(1 << 20).add_(1)
t = threading.Thread(target=helper)
t.start()
t.join()
print(seen["before"], seen["after"], torch.get_num_threads())
"""


def test_only_the_calling_thread_runs_without_a_team():
    if not torch.backends.openmp.is_available():
        raise AssertionError("this torch build has no OpenMP: the engine's CPU threading is not what it expects")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    before, after, main = map(int, out.stdout.split())
    assert (before, after, main) == (2, 1, 2)
