"""Whole prefix chunks of KV in and out of the paged cache: the engine side of the shared prefix
cache (the tier every router-service replica shares; deployments/shared_cache stores it in Redis).
The engine knows nothing about Redis; it hands out and takes in `KVChunk`s.

A chunk is `chunk_tokens` positions (a whole number of blocks) of one sequence (prompt, then
generated tokens). It holds the KV of the NoPE ("full") layers always, and that of the chunked
RoPE layers only when a later request ending its prefix near this chunk can use it (see
`ChunkPolicy.groups_for`): a RoPE layer at position p attends only inside p's
`attention_chunk_size` window, so KV of earlier windows is dead weight for every request that
resumes after them.

`SharedCachePort` is the engine's one connection to the tier (policy, writer, copies between the
paged cache and chunks); `KVTransfer` is one sequence's traffic through it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

import torch

from deployments.engine.block_pool import NoFreeBlocks
from deployments.engine.kv_cache import KVCache
from deployments.engine.kv_manager import KVGroup, KVManager
from deployments.engine.sequence import Sequence


@dataclass
class KVChunk:
    index: int  # chunk number within the sequence (positions index*chunk_tokens ..)
    digest: bytes  # chained hash of its last block: tenant salt, every earlier token, images
    kv: dict[str, torch.Tensor]  # group name -> [layers of the group, 2 (k, v), chunk_tokens, KV heads, head_dim]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv.values())


class SharedCacheWriter(Protocol):
    """Where the engine sends newly computed chunks (the Redis writer)."""

    chunk_tokens: int

    def ready(self) -> bool:
        """False when a chunk would be dropped anyway (too many bytes in flight): skip the copy."""

    def put(self, seq: Sequence, chunk: KVChunk) -> None: ...


@dataclass(frozen=True)
class ChunkPolicy:
    chunk_tokens: int
    block_size: int

    def __post_init__(self) -> None:
        if self.chunk_tokens % self.block_size:
            raise ValueError(f"chunk_tokens {self.chunk_tokens} must be a multiple of the KV block size "
                             f"{self.block_size}")

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.block_size

    def prompt_chunks(self, num_prompt_tokens: int) -> int:
        """Full chunks that a later request can reuse: never the prompt's last token (it must be
        computed to sample), so chunks ending at or before `num_prompt_tokens - 1`."""
        return (num_prompt_tokens - 1) // self.chunk_tokens

    def groups_for(self, groups: list[KVGroup], index: int, num_chunks: int) -> list[KVGroup]:
        """The groups whose KV chunk `index` stores when the sequence's reusable prefix has
        `num_chunks` chunks: full-history groups always; a windowed group only when the chunk lies
        in the window of the prefix end (the only place a resuming request still reads it)."""
        end = num_chunks * self.chunk_tokens
        start = index * self.chunk_tokens
        return [g for g in groups if g.chunk is None or start >= end // g.chunk * g.chunk]


class SharedCachePort:
    """The engine's connection to the shared tier: which chunks a prompt has, and copies of chunks
    between the paged cache and `KVChunk`s."""

    def __init__(self, kv: KVManager, cache: KVCache, writer: SharedCacheWriter):
        self.kv = kv
        self.cache = cache
        self.writer = writer
        self.policy = ChunkPolicy(writer.chunk_tokens, kv.block_size)

    def prefix_chunks(self, seq: Sequence) -> tuple[list[bytes], int]:
        """Digests of `seq`'s reusable prompt chunks, and how many leading ones the local cache
        holds (read-only)."""
        bpc, bs = self.policy.blocks_per_chunk, self.kv.block_size
        digests = [seq.hash_of_block((j + 1) * bpc - 1, bs) for j in range(self.policy.prompt_chunks(seq.num_tokens))]
        return digests, self.kv.cached_leading_blocks(seq, len(digests) * bpc) // bpc

    def export(self, seq: Sequence, index: int, groups: list[KVGroup]) -> KVChunk | None:
        """Copy chunk `index` of `seq` (computed) to the CPU; None if its blocks are gone."""
        bpc = self.policy.blocks_per_chunk
        first = index * bpc
        tables = {g.name: seq.tables.get(g.name, [])[first : first + bpc] for g in groups}
        if any(len(t) < bpc or min(t) < 0 for t in tables.values()):
            return None
        kv = {}
        for g in groups:
            ids = torch.tensor(tables[g.name], dtype=torch.long, device=self.cache.k[g.layers[0]].device)
            parts = [torch.stack([self.cache.k[layer][ids], self.cache.v[layer][ids]]) for layer in g.layers]
            kv[g.name] = torch.stack(parts).flatten(2, 3).to("cpu")
        return KVChunk(index, seq.hash_of_block(first + bpc - 1, self.kv.block_size), kv)

    def load(self, seq: Sequence, chunk: KVChunk, pinned: list[tuple[str, int]]) -> bool:
        """Put a fetched chunk into the paged cache as local prefix-cache entries, appending the
        blocks to `pinned` (held until `seq` is admitted). Blocks already cached locally are
        reused. False if the pool is full."""
        bs, bpc = self.kv.block_size, self.policy.blocks_per_chunk
        for g in self.kv.groups:
            data = chunk.kv.get(g.name)
            if data is None:
                continue
            pool = self.kv.pools[g.name]
            new: list[tuple[int, int, bytes, list[int]]] = []  # (index in chunk, block, digest, tokens)
            for i in range(bpc):
                b = chunk.index * bpc + i
                digest, tokens = seq.hash_of_block(b, bs), seq.block_tokens(b, bs)
                block = pool.lookup(digest, tokens)
                if block is None:
                    try:
                        block = pool.allocate()
                    except NoFreeBlocks:
                        self._copy(g, data, new)
                        return False
                    new.append((i, block, digest, tokens))
                pinned.append((g.name, block))
            self._copy(g, data, new)
        return True

    def _copy(self, g: KVGroup, data: torch.Tensor, new: list[tuple[int, int, bytes, list[int]]]) -> None:
        """Write the chunk's rows for the newly allocated blocks (one indexed copy per layer), then
        make them prefix-cache entries."""
        if not new:
            return
        device = self.cache.k[g.layers[0]].device
        rows = torch.tensor([i for i, *_ in new], dtype=torch.long)
        blocks = torch.tensor([block for _, block, *_ in new], dtype=torch.long, device=device)
        data = data.unflatten(2, (self.policy.blocks_per_chunk, self.kv.block_size))[:, :, rows].to(device)
        for n, layer in enumerate(g.layers):
            self.cache.k[layer][blocks] = data[n, 0]
            self.cache.v[layer][blocks] = data[n, 1]
        for _, block, digest, tokens in new:
            self.kv.pools[g.name].register(block, digest, tokens)


@dataclass
class KVTransfer:
    """One sequence's traffic with the shared tier: the chunks loaded for it (their blocks pinned
    until admission), how many of its cached tokens they gave, and the chunks offered so far."""

    seq: Sequence
    port: SharedCachePort
    num_known_chunks: int = 0  # leading prompt chunks the tier already holds: never offered again
    pinned: list[tuple[str, int]] = field(default_factory=list)  # (group, block) held until admission
    loaded_span: tuple[int, int] = (0, 0)  # token positions covered by the loaded chunks
    num_offered_chunks: int = 0
    num_cached_tokens_shared: int = 0  # of the sequence's cached prompt tokens, those loaded from the tier

    def load(self, chunks: Seq[KVChunk]) -> None:
        """Load fetched chunks in order; a full pool ends the run."""
        loaded = []
        for chunk in chunks:
            if not self.port.load(self.seq, chunk, self.pinned):
                break
            loaded.append(chunk)
        if loaded:
            ct = self.port.policy.chunk_tokens
            self.loaded_span = (loaded[0].index * ct, (loaded[-1].index + 1) * ct)

    def admitted(self, num_cached: int, first_time: bool) -> None:
        """The scheduler matched `num_cached` prefix tokens (taking its own references): drop the
        pins, and on the first admission count the tokens the loaded chunks gave."""
        if first_time:
            start, end = self.loaded_span
            self.num_cached_tokens_shared = max(0, min(num_cached, end) - start)
        self.release()

    def release(self) -> None:
        """Drop the references that kept loaded blocks alive until admission."""
        for name, block in self.pinned:
            self.port.kv.pools[name].free(block)
        self.pinned.clear()

    def offer_computed(self) -> None:
        """Offer the chunks the sequence completed (before their windowed blocks are freed): prompt
        chunks during prefill, then chunks of generated tokens (the next turn of a chat starts with
        them). Windowed-layer KV goes with the chunks in the window of the prompt's reusable end,
        or of the newest chunk once generation passes it."""
        seq, port = self.seq, self.port
        policy = port.policy
        done = min(seq.num_computed, seq.num_tokens - 1) // policy.chunk_tokens
        total = max(policy.prompt_chunks(seq.num_prompt_tokens), done)
        for j in range(max(self.num_offered_chunks, self.num_known_chunks), done):
            chunk = port.export(seq, j, policy.groups_for(port.kv.groups, j, total)) if port.writer.ready() else None
            if chunk is not None:
                port.writer.put(seq, chunk)
        self.num_offered_chunks = max(self.num_offered_chunks, done)
