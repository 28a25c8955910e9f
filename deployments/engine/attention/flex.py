"""The flex attention backend: one compiled `torch.nn.attention.flex_attention` call per layer for
the whole batch (prefill chunks and decode rows alike), reading the paged KV cache in place.

The cache of a layer, `[num_blocks, block_size, KV, D]`, is viewed as one long key sequence of
`num_blocks * block_size` physical slots; nothing is gathered or copied. The queries of every
sequence of the step are packed into one query sequence, and the GQA group of each token is packed
into the query-length axis too (`[1, KV, T * G, D]`, row `t * G + g`), so the kernel sees a GQA
ratio of 1 (flex's GPU decoding kernel rejects ratios that are not powers of two; Llama 4 has 5).

Which keys a query row may see is said twice, as flex needs:
- the block mask (`BlockMask.from_kv_blocks`) lists, per block of query tokens, the physical KV
  blocks of their sequences' attention windows: the compiled kernel visits only those;
- the `mask_mod` maps a physical slot to (sequence, logical position) and checks ownership,
  causality and the window itself, because eager flex ignores the block list and because one
  query block may hold tokens of several sequences (the GPU's 16-token query blocks).

Ownership without a `[sequences, num_blocks]` matrix: a physical block in use belongs to one
logical block index whatever sequence holds it (prefix-cache sharing only shares identical
prefixes), kept in a per-group `logical_of[num_blocks + 1]` device buffer; each sequence's window
blocks sit in a small ring `[T_pad, W]` at `logical % W`; a slot is owned by a sequence when its
ring holds that block at that logical index. Stale `logical_of` entries can only point at ring
cells holding other blocks, so they never pass the check.

Everything a step needs (token -> sequence, position, window start, rings, slots, block lists) is
built on the host in one int32 buffer (numpy; pinned on CUDA) and copied once per step and group.
Shapes are padded to power-of-two buckets (tokens >= 16, window blocks >= 64; for `ring_decode`
tokens >= 1, window blocks >= 16), since `dynamic=True` does not compile on the CPU: each bucket
compiles once per process (compiled kernels are shared by all engines through the module-level
`torch.compile` cache).

On the CPU flex is slow at both ends: its kernel tiles queries by one token x the GQA group and
keys by one cache block. Steps with prefill chunks attend with one `scaled_dot_product_attention`
over the windows gathered from the cache (gathered.py, `gather_prefill`), about twice as fast;
decode-only steps read each row's ring of window blocks in place (ring.py, `ring_decode`), ~0.8
against ~1.2 ms per layer at batch 64 (bench/RESULTS.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from deployments.engine.attention.gathered import GatheredLayout, gathered_attention, gathered_layout, worth_it
from deployments.engine.attention.ring import compiled_ring_decode

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch.nn.attention.flex_attention import FlexKernelOptions

    from deployments.engine.kv_manager import KVGroup, KVManager
    from deployments.engine.scheduler import ScheduledChunk

MIN_TOKENS = 16  # smallest query-token bucket
MIN_WINDOW_BLOCKS = 64  # smallest bucket of KV blocks per sequence window
MIN_DECODE_WINDOW_BLOCKS = 16  # the same for `ring_decode` (CPU decode-only steps)
GPU_QUERY_BLOCK_TOKENS = 16  # tokens per flex query block on CUDA (its kernels tile 16+ rows)

# One compiled flex per process: dynamo keeps one graph per bucket (shapes, dtype, GQA group); the
# per-step tensors the mask reads are closure inputs of the graph, so new steps never recompile.
# Each model shape x dtype x bucket is one entry, more than dynamo's default limit of 8.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
_compiled_flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@dataclass
class FlexLayout:
    slots: torch.Tensor  # [T] flat cache slot of every query row's new KV
    num_tokens: int  # T (rows beyond it are padding)
    tok_seq: torch.Tensor  # [T_pad] batch index of each token's sequence
    tok_pos: torch.Tensor  # [T_pad] absolute position (-1: padding, sees nothing)
    tok_win: torch.Tensor  # [T_pad] first position the token may see
    ring: torch.Tensor  # [T_pad, W] physical block of logical block b at b % W (num_blocks = empty)
    ring_logical: torch.Tensor  # [T_pad, W] the logical block index of each ring cell
    kv_num: torch.Tensor | None  # [Q] KV blocks listed per query block (None in a `decode` layout)
    kv_idx: torch.Tensor | None  # [Q, M] the listed physical blocks (None in a `decode` layout)
    logical_of: torch.Tensor  # [num_blocks + 1] logical block index of each physical block in use
    tokens_per_qblock: int
    block_size: int
    decode: bool = False  # attend with `ring_decode` (a CPU decode-only step), not flex
    _masks: dict[int, BlockMask] = field(default_factory=dict)

    def block_mask(self, group_size: int) -> BlockMask:
        """The block mask for `group_size` query heads per KV head (built once per step and group)."""
        if group_size not in self._masks:
            if self.kv_num is None or self.kv_idx is None:
                raise ValueError("a decode layout (ring_decode) lists no KV blocks: it has no block mask")
            t_pad, width = self.ring.shape
            num_slots = (self.logical_of.numel() - 1) * self.block_size
            self._masks[group_size] = BlockMask.from_kv_blocks(
                self.kv_num[None, None], self.kv_idx[None, None],
                BLOCK_SIZE=(self.tokens_per_qblock * group_size, self.block_size),
                mask_mod=self._mask_mod(group_size), seq_lengths=(t_pad * group_size, num_slots),
                compute_q_blocks=False,
            )
        return self._masks[group_size]

    def _mask_mod(self, group_size: int) -> Callable[..., torch.Tensor]:
        tok_seq, tok_pos, tok_win, ring = self.tok_seq, self.tok_pos, self.tok_win, self.ring
        logical_of, bs, width = self.logical_of, self.block_size, self.ring.shape[1]

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            t = q_idx // group_size
            block = kv_idx // bs
            logical = logical_of[block]
            pos = logical * bs + kv_idx % bs
            owned = ring[tok_seq[t], logical % width] == block
            return owned & (pos <= tok_pos[t]) & (pos >= tok_win[t])

        return mask_mod


class FlexBackend:
    """`compiled=False` runs flex eagerly (slow, materializes scores; for checking the mask)."""

    def __init__(self, kv: KVManager, device: torch.device, compiled: bool = True):
        self.kv = kv
        self.device = device
        self.compiled = compiled
        self.tokens_per_qblock = GPU_QUERY_BLOCK_TOKENS if device.type == "cuda" else 1
        # CPU prefill steps: one SDPA over gathered windows (gathered.py), cheaper there than flex;
        # CPU decode-only steps: `ring_decode`
        self.gather_prefill = compiled and device.type == "cpu"
        self.ring_decode = compiled and device.type == "cpu"
        self._logical_of = {g.name: torch.zeros(g.num_blocks + 1, dtype=torch.int32, device=device)
                            for g in kv.groups}

    def layout(self, group: KVGroup, chunks: list[ScheduledChunk]) -> FlexLayout | GatheredLayout:
        if self.gather_prefill and worth_it(chunks, group, self.kv.block_size):
            return gathered_layout(group, chunks, self.kv.block_size, self.device)
        bs, nb, tpq = self.kv.block_size, group.num_blocks, self.tokens_per_qblock
        starts = np.array([c.start for c in chunks], dtype=np.int64)
        counts = np.array([c.num_tokens for c in chunks], dtype=np.int64)
        num_seqs, num_tokens = len(chunks), int(counts.sum())
        decode = self.ring_decode and num_tokens == num_seqs
        t_pad = _bucket(num_tokens, 1 if decode else MIN_TOKENS)  # ring_decode computes every padding row
        num_qblocks = t_pad // tpq

        # each sequence's window blocks this step: logical lo..hi
        first_window = starts // group.chunk * group.chunk if group.chunk is not None else np.zeros_like(starts)
        lo, hi = first_window // bs, (starts + counts - 1) // bs
        span = hi - lo + 1
        width = _bucket(int(span.max()), MIN_DECODE_WINDOW_BLOCKS if decode else MIN_WINDOW_BLOCKS)
        max_listed = min(nb, tpq * width)
        # The CPU kernel wants a block list as long as the whole cache (num_blocks entries) though
        # it reads only each row's first kv_num: there the rows overlap (stride max_listed) and the
        # tail past the last row is left unwritten.
        tail = nb - max_listed if self.device.type == "cpu" else 0
        phys = np.fromiter(itertools.chain.from_iterable(
            c.seq.tables[group.name][a : b + 1] for c, a, b in zip(chunks, lo.tolist(), hi.tolist(), strict=True)
        ), dtype=np.int64, count=int(span.sum()))
        seq_of = np.repeat(np.arange(num_seqs), span)
        logical = np.arange(len(phys)) - np.repeat(np.cumsum(span) - span, span) + np.repeat(lo, span)

        # one int32 host buffer, one copy to the device; `ring_decode` reads no block list
        sizes = {"tok_seq": t_pad, "tok_pos": t_pad, "tok_win": t_pad, "ring": t_pad * width,
                 "ring_logical": t_pad * width, "slots": num_tokens}
        if not decode:
            sizes.update(kv_num=num_qblocks, kv_idx=num_qblocks * max_listed + tail)
        host = self._host_buffer(sum(sizes.values()))
        views, offset = {}, 0
        for name, n in sizes.items():
            views[name] = host[offset : offset + n]
            offset += n
        ring = views["ring"].reshape(t_pad, width)
        ring[:] = nb
        ring[seq_of, logical % width] = np.where(phys >= 0, phys, nb)
        ring_logical = views["ring_logical"].reshape(t_pad, width)
        ring_logical[:] = 0
        ring_logical[seq_of, logical % width] = logical

        tok_seq = np.repeat(np.arange(num_seqs), counts)
        tok_pos = np.arange(num_tokens) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts, counts)
        tok_win = tok_pos // group.chunk * group.chunk if group.chunk is not None else np.zeros_like(tok_pos)
        views["tok_seq"][:] = 0
        views["tok_seq"][:num_tokens] = tok_seq
        views["tok_pos"][:] = -1
        views["tok_pos"][:num_tokens] = tok_pos
        views["tok_win"][:] = 0
        views["tok_win"][:num_tokens] = tok_win
        views["slots"][:] = ring[tok_seq, (tok_pos // bs) % width] * bs + tok_pos % bs

        if not decode:  # the block list of flex's block mask
            # the KV blocks each query block visits: per (query block, sequence) the union of its
            # tokens' windows, deduplicated per query block (sequences may share prefix blocks)
            qblock = np.arange(num_tokens) // tpq
            key = qblock * num_seqs + tok_seq
            seg = np.flatnonzero(np.diff(key, prepend=-1))
            seg_lo = np.minimum.reduceat(tok_win // bs, seg)
            seg_hi = np.maximum.reduceat(tok_pos // bs, seg)
            seg_len = seg_hi - seg_lo + 1
            rep = np.repeat(np.arange(len(seg)), seg_len)
            blk_logical = np.arange(int(seg_len.sum())) - np.repeat(np.cumsum(seg_len) - seg_len, seg_len) + seg_lo[rep]
            blk_q = qblock[seg][rep]
            blk_phys = ring[tok_seq[seg][rep], blk_logical % width].astype(np.int64)
            keep = blk_phys < nb
            blk_q, blk_phys = blk_q[keep], blk_phys[keep]
            if tpq > 1:
                unique = np.unique(blk_q * nb + blk_phys)
                blk_q, blk_phys = unique // nb, unique % nb
            kv_num = np.bincount(blk_q, minlength=num_qblocks)
            views["kv_num"][:] = kv_num
            kv_idx = views["kv_idx"][: num_qblocks * max_listed].reshape(num_qblocks, max_listed)
            kv_idx[:] = 0
            kv_idx[blk_q, np.arange(len(blk_q)) - np.repeat(np.cumsum(kv_num) - kv_num, kv_num)] = blk_phys

        dev = self._to_device(host)
        parts, offset = {}, 0
        for name, n in sizes.items():
            parts[name] = dev[offset : offset + n]
            offset += n
        logical_of = self._logical_of[group.name]
        ring_dev, ring_logical_dev = parts["ring"].view(t_pad, width), parts["ring_logical"].view(t_pad, width)
        logical_of[ring_dev] = ring_logical_dev  # empty cells write the spare entry
        return FlexLayout(
            slots=parts["slots"], num_tokens=num_tokens, tok_seq=parts["tok_seq"], tok_pos=parts["tok_pos"],
            tok_win=parts["tok_win"], ring=ring_dev, ring_logical=ring_logical_dev,
            kv_num=None if decode else parts["kv_num"],
            kv_idx=None if decode else parts["kv_idx"].as_strided((num_qblocks, max_listed + tail), (max_listed, 1)),
            logical_of=logical_of,
            tokens_per_qblock=tpq, block_size=bs, decode=decode,
        )

    def _host_buffer(self, n: int) -> np.ndarray:
        if self.device.type == "cuda":  # pinned, from torch's caching host allocator
            return torch.empty(n, dtype=torch.int32, pin_memory=True).numpy()
        return np.empty(n, dtype=np.int32)

    def _to_device(self, host: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(host).to(self.device, non_blocking=True)

    def _kernel_options(self, block_size: int) -> FlexKernelOptions | None:
        """On CUDA: the general kernel (not flex decoding) with tiles as small as the block mask's
        (16 query rows, one cache block of keys). Unmeasured: no GPU has run this yet."""
        if self.device.type != "cuda":
            return None
        return {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": 16, "BLOCK_N": block_size}

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                layout: FlexLayout | GatheredLayout, scale: float) -> torch.Tensor:
        if isinstance(layout, GatheredLayout):
            return gathered_attention(q, k_cache, v_cache, layout, scale)
        if layout.decode:
            return compiled_ring_decode(q, k_cache, v_cache, layout.ring, layout.ring_logical, layout.tok_pos,
                                        layout.tok_win, scale)
        num_tokens, heads, dim = q.shape
        num_blocks, bs, kv_heads, _ = k_cache.shape
        group = heads // kv_heads
        t_pad = layout.ring.shape[0]
        # [T, H, D] -> [1, KV, T_pad * G, D], row t * G + g (q head h reads KV head h // G)
        qp = F.pad(q, (0, 0, 0, 0, 0, t_pad - num_tokens)).view(t_pad, kv_heads, group, dim)
        qp = qp.transpose(0, 1).reshape(1, kv_heads, t_pad * group, dim)
        k = k_cache.view(1, num_blocks * bs, kv_heads, dim).transpose(1, 2)
        v = v_cache.view(1, num_blocks * bs, kv_heads, dim).transpose(1, 2)
        attend = _compiled_flex if self.compiled else flex_attention
        out = attend(qp, k, v, block_mask=layout.block_mask(group), scale=scale,
                     kernel_options=self._kernel_options(bs))
        assert isinstance(out, torch.Tensor)  # no lse requested
        return out.view(kv_heads, t_pad, group, dim).transpose(0, 1).reshape(t_pad, heads, dim)[:num_tokens]
