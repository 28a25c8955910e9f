"""Where the routed experts of each MoE layer run. The engine computes attention, the router and
the shared expert itself and hands `(hidden, expert ids, scores)` to an `ExpertBackend`: in-process
("colocated") here, or expert shards in the cluster (deployments/collective_experts.py).

A backend may need every forward pass framed (`step()`, e.g. one step of a lockstep collective
group), may want the pass split into micro-batches run on two threads (`micro_batches`, each in
`micro_batch(i)`, so that one's attention overlaps the other's experts), and may need the engine to
call `idle()` when it has nothing to run (`lockstep`: the other members of its group wait for it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch

from model.llama4 import Llama4


class ExpertBackendUnavailable(RuntimeError):
    """The expert backend cannot run now (e.g. an expert shard died): not any one request's fault,
    so a step that raises it fails all of its requests instead of looking for a culprit."""


class ExpertBackendNotReady(ExpertBackendUnavailable):
    """The expert backend could not begin a forward pass (its group is forming, a shard restarts):
    nothing ran, so no request is at fault or in flight; the engine keeps them all and tries again."""


class ExpertBackend(Protocol):
    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of expert(score * x); `x` `[T, hidden]`, ids and scores `[T, k]`."""
        ...

    lockstep: bool
    """True: call `idle()` whenever the engine has nothing to run."""

    @property
    def micro_batches(self) -> int:
        """Micro-batches per forward pass (1: no split)."""
        ...

    def step(self) -> contextlib.AbstractContextManager:
        """Frames one forward pass (raises ExpertBackendUnavailable when the backend cannot run it)."""
        ...

    def micro_batch(self, index: int) -> contextlib.AbstractContextManager:
        """Frames the model's pass over micro-batch `index` of the current step, in this thread."""
        ...

    def idle(self) -> None:
        """The engine has nothing to run (lockstep backends take part in their group's step)."""
        ...


class UnframedBackend:
    """Defaults for a backend that needs no framing: one micro-batch, nothing to do when idle."""

    lockstep = False
    micro_batches = 1

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def micro_batch(self, index: int) -> Iterator[None]:
        yield

    def idle(self) -> None:
        pass


class ColocatedExperts(UnframedBackend):
    """Runs the experts held by the model itself."""

    def __init__(self, model: Llama4):
        self._layers = model.language_model.model.layers

    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # nn.ModuleList items are typed as plain Modules: this layer's feed_forward is a MoE
        return self._layers[layer].feed_forward.experts(x, expert_ids, scores)  # type: ignore[union-attr, operator]
