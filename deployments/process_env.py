"""Environment for the processes of a sharded deployment (router-service replicas and expert shards),
set when Ray starts them: torch is not imported here, so a process can read it before torch loads.

PyTorch's OpenMP runtime (libgomp) keeps its worker threads spinning for up to 300,000 rounds
(milliseconds on the 2-core CPU measured) after each parallel region before they sleep. A replica
that then waits a few hundred microseconds per MoE layer for its expert shards holds, with those
spinning threads, the cores the shards on the same node need: measured on 2 cores with small-scout
(bench/RESULTS.md, "MoE dispatch", issue 11), 1.4 ms of exchange overhead per MoE layer at batch 1
instead of 0.5, and 0.66 instead of 0.89 of colocated decode throughput at batch 128. Not spinning
at all (OMP_WAIT_POLICY=PASSIVE) halved decode at batch 128 instead (every parallel region wakes
its workers). 10,000 rounds (tens of microseconds) keep them awake across the back-to-back regions
of one op sequence. Only for sharded deployments: a colocated engine waits on nobody (its decode
steps, eager and compiled, measured the same with either spin, within the 2-core machine's noise).
A value in the environment of the process that starts them (the node's) wins (`env_for_sharded`)."""

from __future__ import annotations

import os

SHARED_CORES_ENV = {"GOMP_SPINCOUNT": "10000"}


def env_for_sharded(environ: os._Environ[str] | dict[str, str] = os.environ) -> dict[str, str]:
    """`SHARED_CORES_ENV` without the variables `environ` (the node's) already sets."""
    return {name: value for name, value in SHARED_CORES_ENV.items() if name not in environ}


def use_sharded_env(environ: os._Environ[str] | dict[str, str] = os.environ) -> None:
    """Give this process (a benchmark standing in for a replica) the sharded deployment's settings,
    before it imports torch; what `environ` already sets stays."""
    environ.update(env_for_sharded(environ))
