"""The reference attention backend: PyTorch SDPA per sequence over a gathered KV window. Exact on
the CPU and the yardstick every other backend is tested against; one SDPA call per sequence and
layer, so not the fast path on a GPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from deployments.engine.kv_manager import KVGroup, KVManager
    from deployments.engine.scheduler import ScheduledChunk


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


class ReferenceBackend:
    def __init__(self, kv: KVManager, device: torch.device):
        self.kv = kv
        self.device = device

    def layout(self, group: KVGroup, chunks: list[ScheduledChunk]) -> BatchLayout:
        bs = self.kv.block_size
        seqs: list[SeqSlice] = []
        slots: list[int] = []
        row = 0
        for c in chunks:
            start, table = c.start, c.seq.tables[group.name]
            window = self.kv.window_start(group, start)
            last_block = (start + c.num_tokens - 1) // bs
            blocks = torch.tensor(table[window // bs : last_block + 1], dtype=torch.long, device=self.device)
            seqs.append(SeqSlice(row, c.num_tokens, start, window, blocks))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + c.num_tokens))
            row += c.num_tokens
        return BatchLayout(seqs, torch.tensor(slots, dtype=torch.long, device=self.device), group.chunk)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: BatchLayout,
                scale: float) -> torch.Tensor:
        out = torch.empty_like(q)  # [T, H, D]
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
