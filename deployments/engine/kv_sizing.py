"""How many KV blocks each group gets out of `EngineConfig.kv_cache_bytes`.

The chunked (RoPE) group only ever holds one chunk per sequence plus the step's new tokens, so it
gets what `max_num_seqs` sequences can use (at most half the memory); the full-history (NoPE)
group, one layer in four, takes the rest and so sets the longest context.
"""

from __future__ import annotations

import math

import torch

from deployments.engine.config import EngineConfig
from deployments.engine.kv_cache import KVCache
from deployments.engine.kv_manager import KVGroup
from model.config import TextConfig
from model.errors import ConfigError


def chunked_blocks_per_seq(chunk: int, cfg: EngineConfig) -> int:
    """Blocks one sequence may hold at once in the chunked group: its chunk, plus a step's tokens
    that straddle into the next chunk."""
    bs = cfg.block_size
    return math.ceil(chunk / bs) + math.ceil(cfg.max_num_batched_tokens / bs) + 1


def plan_kv_groups(text: TextConfig, cfg: EngineConfig, dtype: torch.dtype) -> list[KVGroup]:
    full = tuple(i for i in range(text.num_hidden_layers) if not text.is_chunked(i))
    chunked = tuple(i for i in range(text.num_hidden_layers) if text.is_chunked(i))

    def block_bytes(num_layers: int) -> int:
        return KVCache.bytes_per_block(num_layers, cfg.block_size, text.num_key_value_heads, text.head_dim, dtype)

    budget = cfg.kv_cache_bytes
    groups = []
    if chunked:
        assert text.attention_chunk_size is not None  # a layer is chunked only with a chunk size
        per_seq = chunked_blocks_per_seq(text.attention_chunk_size, cfg)
        fit = budget // 2 // block_bytes(len(chunked)) if full else budget // block_bytes(len(chunked))
        n = cfg.num_blocks_chunked or max(per_seq, min(cfg.max_num_seqs * per_seq, fit))
        if n < per_seq:
            raise ConfigError(f"num_blocks_chunked={n} cannot hold one sequence's chunk ({per_seq} blocks)")
        groups.append(KVGroup("chunked", chunked, text.attention_chunk_size, n))
        budget -= n * block_bytes(len(chunked))
    if full:
        n = cfg.num_blocks_full or budget // block_bytes(len(full))
        if n < 2:
            raise ConfigError(f"kv_cache_bytes={cfg.kv_cache_bytes} leaves no room for the full-attention KV; raise it")
        groups.append(KVGroup("full", full, None, n))
    return groups
