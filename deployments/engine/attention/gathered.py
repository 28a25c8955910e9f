"""Prefill steps of the flex backend on the CPU: one `scaled_dot_product_attention` call per layer
over each sequence's attention window gathered from the paged cache.

Why: the CPU flex kernel tiles queries by the block mask's query block (one token x the GQA group,
4 rows on Llama 4 shapes) and keys by one cache block, so a prefill step spends most of its
attention time in per-tile overhead; measured on small-scout (2 cores, fp32), a 2048-token prefill
layer took ~20 ms in compiled flex and ~10 ms as one batched SDPA with the window gathered (see
bench/RESULTS.md). Decode-only steps do not come here (flex.py's `ring_decode`, reading the cache
in place).

Layout: the step's sequences are rows of a padded batch `[S, Lq]` (queries) x `[S, W * block_size]`
(keys: the physical blocks of each sequence's window, logical blocks lo..hi, gathered); a boolean
mask says, per query, which keys are its own (causal, inside its attention window, real blocks).
Padding query rows see one key (their output is dropped): a fully masked row would be NaN.
A step that mixes decode rows and prefill chunks is two such batches (two SDPA calls per layer:
padding one-token rows to a chunk's length would cost more); a part whose padding would cost more
than MAX_PADDING x its real work (chunks of very different lengths) leaves the step to flex.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from deployments.engine.kv_manager import KVGroup
    from deployments.engine.scheduler import ScheduledChunk

MAX_PADDING = 2.0  # padded query rows x key slots over the real ones, at most, per part


def _parts(chunks: list[ScheduledChunk]) -> list[list[int]]:
    """Chunk indices of the decode rows and of the prefill chunks (the non-empty ones)."""
    decode = [i for i, c in enumerate(chunks) if c.num_tokens == 1]
    prefill = [i for i, c in enumerate(chunks) if c.num_tokens > 1]
    return [p for p in (decode, prefill) if p]


def worth_it(chunks: list[ScheduledChunk], group: KVGroup, block_size: int) -> bool:
    """Whether this is a step with prefill chunks and each part's padded batch costs at most
    MAX_PADDING x the attention work of its chunks (decode-only steps never)."""
    if all(c.num_tokens == 1 for c in chunks):
        return False
    for part in _parts(chunks):
        sub = [chunks[i] for i in part]
        counts = np.array([c.num_tokens for c in sub], dtype=np.int64)
        lo, hi = _window_blocks(sub, group, block_size)
        keys = (hi - lo + 1) * block_size
        if len(sub) * int(counts.max()) * int(keys.max()) > MAX_PADDING * int((counts * keys).sum()):
            return False
    return True


def _window_blocks(chunks: list[ScheduledChunk], group: KVGroup, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per chunk, the first and last logical KV block of its window this step."""
    starts = np.array([c.start for c in chunks], dtype=np.int64)
    ends = starts + np.array([c.num_tokens for c in chunks], dtype=np.int64)
    first = starts // group.chunk * group.chunk if group.chunk is not None else np.zeros_like(starts)
    return first // block_size, (ends - 1) // block_size


@dataclass
class GatheredPart:
    """Some of the step's sequences (the decode rows, or the prefill chunks) as one padded batch."""

    rows: torch.Tensor  # [R] the step rows (query tokens) of this part
    q_index: torch.Tensor  # [S, Lq] step row of each padded query (T: a zero padding row)
    out_index: torch.Tensor  # [R] where each of `rows` sits in the flattened [S * Lq]
    blocks: torch.Tensor  # [S, W] physical blocks of each window (padding: block 0, masked)
    mask: torch.Tensor  # [S, 1, Lq, W * block_size] True: the query sees the key


@dataclass
class GatheredLayout:
    slots: torch.Tensor  # [T] flat cache slot of every query row's new KV
    num_tokens: int
    parts: list[GatheredPart]  # one, or two in a step mixing decode rows and prefill chunks


def gathered_layout(group: KVGroup, chunks: list[ScheduledChunk], block_size: int,
                    device: torch.device) -> GatheredLayout:
    counts = np.array([c.num_tokens for c in chunks], dtype=np.int64)
    first_row = np.cumsum(counts) - counts
    num_tokens = int(counts.sum())
    slots = np.empty(num_tokens, dtype=np.int64)
    parts = [_part(group, [chunks[i] for i in part], first_row[part], num_tokens, slots, block_size, device)
             for part in _parts(chunks)]
    return GatheredLayout(slots=torch.from_numpy(slots).to(device), num_tokens=num_tokens, parts=parts)


def _part(group: KVGroup, chunks: list[ScheduledChunk], first_row: np.ndarray, num_tokens: int,
          slots: np.ndarray, bs: int, device: torch.device) -> GatheredPart:
    """The padded batch of `chunks`, whose tokens are step rows first_row[i]..; fills their `slots`."""
    counts = np.array([c.num_tokens for c in chunks], dtype=np.int64)
    starts = np.array([c.start for c in chunks], dtype=np.int64)
    num_seqs, lq = len(chunks), int(counts.max())
    lo, hi = _window_blocks(chunks, group, bs)
    span = hi - lo + 1
    width = int(span.max())

    # the window's physical blocks, padded with block 0 (masked out)
    phys = np.fromiter(itertools.chain.from_iterable(
        c.seq.tables[group.name][a : b + 1] for c, a, b in zip(chunks, lo.tolist(), hi.tolist(), strict=True)
    ), dtype=np.int64, count=int(span.sum()))
    seq_of = np.repeat(np.arange(num_seqs), span)
    col = np.arange(len(phys)) - np.repeat(np.cumsum(span) - span, span)
    blocks = np.zeros((num_seqs, width), dtype=np.int64)
    blocks[seq_of, col] = np.maximum(phys, 0)
    phys_ok = np.zeros((num_seqs, width), dtype=bool)
    phys_ok[seq_of, col] = phys >= 0

    # queries: the i-th token of sequence s at [s, i]
    tok_seq = np.repeat(np.arange(num_seqs), counts)
    tok_col = np.arange(len(tok_seq)) - np.repeat(np.cumsum(counts) - counts, counts)
    tok_pos = tok_col + starts[tok_seq]
    rows = first_row[tok_seq] + tok_col
    q_index = np.full((num_seqs, lq), num_tokens, dtype=np.int64)
    q_index[tok_seq, tok_col] = rows
    q_pos = np.full((num_seqs, lq), -1, dtype=np.int64)
    q_pos[tok_seq, tok_col] = tok_pos
    q_win = np.zeros((num_seqs, lq), dtype=np.int64)
    q_win[tok_seq, tok_col] = tok_pos // group.chunk * group.chunk if group.chunk is not None else 0
    slots[rows] = blocks[tok_seq, tok_pos // bs - lo[tok_seq]] * bs + tok_pos % bs

    # key j of sequence s: logical position (lo[s] + j // bs) * bs + j % bs
    to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    k_pos, k_ok = to(lo[:, None] * bs + np.arange(width * bs)[None, :]), to(np.repeat(phys_ok, bs, axis=1))
    q_pos_t, q_win_t = to(q_pos), to(q_win)
    mask = (k_pos[:, None, :] <= q_pos_t[:, :, None]) & (k_pos[:, None, :] >= q_win_t[:, :, None])
    mask &= k_ok[:, None, :]
    mask[:, :, 0] |= q_pos_t < 0  # padding rows see one key, never a fully masked row
    return GatheredPart(rows=to(rows), q_index=to(q_index), out_index=to(tok_seq * lq + tok_col),
                        blocks=to(blocks), mask=mask[:, None])


def gathered_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: GatheredLayout,
                       scale: float) -> torch.Tensor:
    """q `[T, H, D]`, caches `[num_blocks, block_size, KV, D]` -> `[T, H, D]`: one SDPA call per part."""
    qp = F.pad(q, (0, 0, 0, 0, 0, 1))  # row T: the padding queries
    if len(layout.parts) == 1:
        return _attend(qp, k_cache, v_cache, layout.parts[0], scale)
    out = torch.empty_like(q)
    for part in layout.parts:
        out.index_copy_(0, part.rows, _attend(qp, k_cache, v_cache, part, scale))
    return out


def _attend(qp: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, part: GatheredPart,
            scale: float) -> torch.Tensor:
    """The part's rows of the attention output, `[R, H, D]` in the order of `part.rows`."""
    _, heads, dim = qp.shape
    seqs, width = part.blocks.shape
    _, bs, kv_heads, _ = k_cache.shape
    lq = part.q_index.shape[1]
    q = qp[part.q_index].transpose(1, 2)  # [S, H, Lq, D]
    k = k_cache[part.blocks].view(seqs, width * bs, kv_heads, dim).transpose(1, 2)  # [S, KV, L, D]
    v = v_cache[part.blocks].view(seqs, width * bs, kv_heads, dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=part.mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(seqs * lq, heads, dim)[part.out_index]
