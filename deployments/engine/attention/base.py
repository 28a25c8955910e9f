"""What an attention backend does: build a per-step layout of the batch for one KV group, then
attend each layer's queries over the paged cache with it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from deployments.engine.kv_manager import KVGroup, KVManager
    from deployments.engine.scheduler import ScheduledChunk


class Layout(Protocol):
    """A backend's description of one step's batch for one KV group (built once, read by every
    layer of the group)."""

    slots: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of every query row's new KV


class AttentionBackend(Protocol):
    """Constructed once per engine as `Backend(kv, device)`."""

    def __init__(self, kv: KVManager, device: torch.device) -> None: ...

    def layout(self, group: KVGroup, chunks: list[ScheduledChunk]) -> Layout:
        """The layout of a step's chunks (a flattened varlen batch, in order) for `group`."""
        ...

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: Layout,
                scale: float) -> torch.Tensor:
        """q `[T, H, D]`, caches `[num_blocks, block_size, KV, D]` (the new KV already written) ->
        `[T, H, D]`: causal, and limited to each query's chunk when the group is chunked."""
        ...
