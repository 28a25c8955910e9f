"""Where the routed experts of each MoE layer run. The engine computes attention, the router and
the shared expert itself and hands `(hidden, expert ids, scores)` to an `ExpertBackend`: in-process
("colocated") here, or expert-shard actors in the cluster."""

from __future__ import annotations

from typing import Protocol

import torch

from model.llama4 import Llama4


class ExpertBackendUnavailable(RuntimeError):
    """The expert backend cannot run now (e.g. an expert shard died): not any one request's fault,
    so a step that raises it fails all of its requests instead of looking for a culprit."""


class ExpertBackend(Protocol):
    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of expert(score * x); `x` `[T, hidden]`, ids and scores `[T, k]`."""
        ...


class ColocatedExperts:
    """Runs the experts held by the model itself."""

    def __init__(self, model: Llama4):
        self._layers = model.language_model.model.layers

    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # nn.ModuleList items are typed as plain Modules: this layer's feed_forward is a MoE
        return self._layers[layer].feed_forward.experts(x, expert_ids, scores)  # type: ignore[union-attr, operator]
