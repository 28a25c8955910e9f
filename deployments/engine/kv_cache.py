"""The paged KV cache tensors, one pair per decoder layer, laid out per KV group:
`[num_blocks, block_size, num_kv_heads, head_dim]` so a slot id is `block * block_size + offset`."""

from __future__ import annotations

import torch

from deployments.engine.kv_manager import KVGroup


class KVCache:
    def __init__(self, groups: list[KVGroup], block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.group_of: dict[int, KVGroup] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for g in groups:
            for layer in g.layers:
                shape = (g.num_blocks, block_size, num_kv_heads, head_dim)
                self.k[layer] = torch.zeros(shape, dtype=dtype, device=device)
                self.v[layer] = torch.zeros(shape, dtype=dtype, device=device)
                self.group_of[layer] = g

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store k, v `[T, KV, D]` at flat `slots` `[T]`."""
        self.k[layer].view(-1, *k.shape[1:])[slots] = k
        self.v[layer].view(-1, *v.shape[1:])[slots] = v
