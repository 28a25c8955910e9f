"""Attention over the paged KV cache for a flattened varlen batch (no padding).

`BatchLayout` is built once per step and KV group: for every scheduled sequence, its query rows in
the batch, their positions, and the blocks its window reads. `paged_attention` is the portable
path (PyTorch SDPA per sequence, exact on the CPU); a fused GPU kernel plugs in behind the same
signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqSlice:
    row_start: int  # first query row of this sequence in the batch
    num_rows: int
    start_pos: int  # absolute position of its first query
    window_start: int  # first key position the earliest query may see
    blocks: torch.Tensor  # block ids covering [window_start // bs * bs, end)


@dataclass(frozen=True)
class BatchLayout:
    seqs: list[SeqSlice]
    slots: torch.Tensor  # [T] flat cache slot of every query row's new KV
    chunk: int | None  # attention window of the group (None = full causal)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: BatchLayout,
                    scale: float) -> torch.Tensor:
    """q `[T, H, D]`, caches `[NB, bs, KV, D]` -> out `[T, H, D]`; causal, limited to the chunk
    of each query when the group is chunked."""
    out = torch.empty_like(q)
    bs = k_cache.shape[1]
    for s in layout.seqs:
        end = s.start_pos + s.num_rows
        first = s.window_start // bs * bs
        k = k_cache[s.blocks].flatten(0, 1)[s.window_start - first : end - first]  # [ctx, KV, D]
        v = v_cache[s.blocks].flatten(0, 1)[s.window_start - first : end - first]
        q_pos = torch.arange(s.start_pos, end, device=q.device)
        k_pos = torch.arange(s.window_start, end, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        if layout.chunk is not None:
            mask &= k_pos[None, :] >= (q_pos // layout.chunk * layout.chunk)[:, None]
        rows = slice(s.row_start, s.row_start + s.num_rows)
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )  # [H, n, D]
        out[rows] = o.transpose(0, 1)
    return out
