"""KV block bookkeeping for Llama 4's two kinds of attention layers.

NoPE layers attend to the whole history, so their group ("full") keeps every block. RoPE layers
attend only within their `attention_chunk_size` chunk, so their group ("chunked") frees a
sequence's blocks as soon as the next position is in a later chunk: long contexts pay full KV only
for one layer in four. Both groups share block numbering per sequence (logical block b holds
positions b*block_size ..), and both take part in the prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from deployments.engine.block_pool import BlockPool
from deployments.engine.sequence import Sequence


@dataclass(frozen=True)
class KVGroup:
    name: str
    layers: tuple[int, ...]  # decoder layer indices whose KV lives in this group
    chunk: int | None  # attention window: None = all history
    num_blocks: int


class KVManager:
    def __init__(self, groups: list[KVGroup], block_size: int):
        self.groups = groups
        self.block_size = block_size
        self.pools = {g.name: BlockPool(g.num_blocks) for g in groups}

    def window_start(self, group: KVGroup, pos: int) -> int:
        """First position a query at `pos` may attend to in `group`."""
        return 0 if group.chunk is None else pos // group.chunk * group.chunk

    def _first_needed_block(self, group: KVGroup, pos: int) -> int:
        return self.window_start(group, pos) // self.block_size

    def blocks_needed(self, seq: Sequence, num_new: int) -> dict[str, int]:
        """New blocks each group needs so positions up to num_computed + num_new - 1 have a slot."""
        last = (seq.num_computed + num_new - 1) // self.block_size
        return {g.name: max(0, last + 1 - len(seq.tables.get(g.name, []))) for g in self.groups}

    def can_allocate(self, seq: Sequence, num_new: int) -> bool:
        need = self.blocks_needed(seq, num_new)
        return all(self.pools[name].num_free >= n for name, n in need.items())

    def allocate(self, seq: Sequence, num_new: int) -> bool:
        """Give `seq` slots for its next `num_new` tokens; all-or-nothing."""
        need = self.blocks_needed(seq, num_new)
        if not all(self.pools[name].num_free >= n for name, n in need.items()):
            return False
        for name, n in need.items():
            table = seq.tables.setdefault(name, [])
            table.extend(self.pools[name].allocate() for _ in range(n))
        return True

    def match_prefix(self, seq: Sequence) -> int:
        """Attach the longest cached prefix of `seq` (full blocks, never its last token) and return
        its length in tokens. A RoPE group needs only the blocks of the chunk the prefix ends in."""
        bs = self.block_size
        blocks = self.cached_leading_blocks(seq, (seq.num_tokens - 1) // bs)
        while blocks and not all(
            self._cached_in([g], seq, b)
            for g in self.groups for b in range(self._first_needed_block(g, blocks * bs), blocks)
        ):
            blocks -= 1
        for g in self.groups:
            first = self._first_needed_block(g, blocks * bs)
            pool = self.pools[g.name]
            taken = [pool.lookup(seq.hash_of_block(b, bs), seq.block_tokens(b, bs)) for b in range(first, blocks)]
            # every block was found cached (`_cached_in`) just above, so no lookup misses
            seq.tables[g.name] = [-1] * first + cast("list[int]", taken)
        seq.num_computed = blocks * bs
        seq.num_registered = blocks
        return blocks * bs

    def cached_leading_blocks(self, seq: Sequence, limit: int) -> int:
        """How many of `seq`'s first `limit` blocks the full-history groups hold, in a leading run
        (read-only: takes no references)."""
        full = self._full_groups()
        blocks = 0
        while blocks < limit and self._cached_in(full, seq, blocks):
            blocks += 1
        return blocks

    def _full_groups(self) -> list[KVGroup]:
        return [g for g in self.groups if g.chunk is None]

    def _cached_in(self, groups: list[KVGroup], seq: Sequence, b: int) -> bool:
        bs = self.block_size
        digest, tokens = seq.hash_of_block(b, bs), seq.block_tokens(b, bs)
        return all(self.pools[g.name].peek(digest, tokens) for g in groups)

    def after_step(self, seq: Sequence) -> None:
        """Offer newly completed blocks to the prefix cache, then free blocks of finished chunks."""
        bs = self.block_size
        for b in range(seq.num_registered, seq.num_computed // bs):
            digest, tokens = seq.hash_of_block(b, bs), seq.block_tokens(b, bs)
            for g in self.groups:
                block = seq.tables[g.name][b]
                if block >= 0:
                    self.pools[g.name].register(block, digest, tokens)
        seq.num_registered = max(seq.num_registered, seq.num_computed // bs)
        for g in self.groups:
            table = seq.tables.get(g.name, [])
            for b in range(min(self._first_needed_block(g, seq.num_computed), len(table))):
                if table[b] >= 0:
                    self.pools[g.name].free(table[b])
                    table[b] = -1

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` (cached ones stay revivable)."""
        for g in self.groups:
            for block in seq.tables.get(g.name, []):
                if block >= 0:
                    self.pools[g.name].free(block)
        seq.tables = {}
        seq.num_registered = 0

    def max_tokens_per_seq(self) -> int:
        """The longest sequence the full-history pools could ever hold alone."""
        full = self._full_groups()
        return min(g.num_blocks for g in full) * self.block_size if full else 2**62
