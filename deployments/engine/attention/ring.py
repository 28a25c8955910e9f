"""Decode-only steps of the flex backend on the CPU: each row's ring of window blocks (the flex
layout's `ring`, `ring_logical`) read in place from the paged cache by gathers, products and sums
that inductor fuses into two loops (scores, then the weighted values).

Why: the CPU flex kernel tiles keys by one cache block and pays per-tile overhead; measured in the
compiled batch-64 decode step of small-scout (2 cores, fp32), ~0.8 ms per layer against ~1.2 ms for
compiled flex (bench/RESULTS.md). Every
slot of a ring is computed, masked or not, so the flex layout makes decode rings as narrow as the
longest window allows (a power of two >= MIN_DECODE_WINDOW_BLOCKS) and pads rows to a power of two
>= 1 only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.fusion import realize


def ring_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ring: torch.Tensor,
                ring_logical: torch.Tensor, tok_pos: torch.Tensor, tok_win: torch.Tensor, scale: float
                ) -> torch.Tensor:
    """Decode rows (one query token per sequence, row t = sequence t) over their rings of window
    blocks, read in place: q `[T, H, D]`, caches `[num_blocks, block_size, KV, D]`, ring and
    ring_logical `[T_pad, W]` -> `[T, H, D]`. Written as gathers, products and sums so that
    inductor fuses each of the two products with its gather (no copy of the keys or values);
    scores and softmax in fp32. Rows past T and masked slots get the most negative score, never
    -inf: a row that sees nothing is uniform, not NaN (its output is dropped)."""
    num_tokens, heads, dim = q.shape
    num_blocks, bs, kv_heads, _ = k_cache.shape
    t_pad, width = ring.shape
    group = heads // kv_heads
    offset = torch.arange(bs, device=q.device)
    slot = (ring.clamp(max=num_blocks - 1)[:, :, None] * bs + offset).view(t_pad, width * bs)  # [T_pad, N]
    pos = (ring_logical[:, :, None] * bs + offset).view(t_pad, width * bs)
    real = (ring < num_blocks)[:, :, None].expand(t_pad, width, bs).reshape(t_pad, width * bs)
    seen = realize(real & (pos <= tok_pos[:, None]) & (pos >= tok_win[:, None]))  # [T_pad, N]
    slot = realize(slot)  # neither recomputed inside the sums' loops (model/fusion.py)
    qg = realize(F.pad(q, (0, 0, 0, 0, 0, t_pad - num_tokens)).float()).view(t_pad, 1, kv_heads, group, dim)
    k = k_cache.view(num_blocks * bs, kv_heads, dim)[slot]  # [T_pad, N, KV, D]
    v = v_cache.view(num_blocks * bs, kv_heads, dim)[slot]
    scores = (qg * k[:, :, :, None, :].float()).sum(-1) * scale  # [T_pad, N, KV, G]
    scores = scores.masked_fill(~seen[:, :, None, None], torch.finfo(torch.float32).min)
    weights = realize(scores.softmax(dim=1))
    out = (weights[..., None] * v[:, :, :, None, :].float()).sum(1)  # [T_pad, KV, G, D]
    return out.to(q.dtype).view(t_pad, heads, dim)[:num_tokens]


compiled_ring_decode = torch.compile(ring_decode, dynamic=False, fullgraph=True)
