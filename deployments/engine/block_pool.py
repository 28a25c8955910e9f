"""Paged KV block allocation with a local prefix cache.

A `BlockPool` hands out fixed-size block ids. Full blocks can be registered under a chained hash
(`block_hash`): when their last user frees them they stay cached, revivable by a later lookup,
until the least recently used one is reused for a new allocation. Reference counts let many
sequences share a cached prefix.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

ROOT_HASH = b""


def block_hash(parent: bytes, token_ids: Sequence[int], extra: Sequence[str] = ()) -> bytes:
    """Chained hash of one full block: parent hash + token ids + extra keys (image hashes; the
    first block's parent carries the tenant salt)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(len(token_ids).to_bytes(4, "little"))
    for t in token_ids:
        h.update(int(t).to_bytes(4, "little"))
    for key in extra:
        h.update(b"\x00" + key.encode())
    return h.digest()


def salted_root(salt: str) -> bytes:
    """The parent hash of a sequence's first block: tenants never share cache entries."""
    return hashlib.blake2b(salt.encode(), digest_size=16, person=b"herd-salt").digest() if salt else ROOT_HASH


class NoFreeBlocks(RuntimeError):
    """The pool is exhausted (the scheduler preempts or waits)."""


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # never cached, or evicted
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # ref 0 but revivable, LRU first
        self._hash_of: dict[int, bytes] = {}
        self._tokens_of: dict[int, tuple[int, ...]] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (free plus evictable cached ones)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._cached_free:
            block, _ = self._cached_free.popitem(last=False)
            self._forget(block)
        else:
            raise NoFreeBlocks("no free KV blocks")
        self.ref_counts[block] = 1
        return block

    def free(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"double free of block {block}"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self._hash_of:
                self._cached_free[block] = None
            else:
                self._free.append(block)

    def lookup(self, digest: bytes, token_ids: Sequence[int]) -> int | None:
        """The cached block for `digest` if its tokens match, with a new reference; else None."""
        block = self._block_of.get(digest)
        if block is None or self._tokens_of[block] != tuple(token_ids):
            return None
        if self.ref_counts[block] == 0:
            del self._cached_free[block]
        self.ref_counts[block] += 1
        return block

    def peek(self, digest: bytes, token_ids: Sequence[int]) -> bool:
        """Whether `lookup` would hit, without taking a reference."""
        block = self._block_of.get(digest)
        return block is not None and self._tokens_of[block] == tuple(token_ids)

    def register(self, block: int, digest: bytes, token_ids: Sequence[int]) -> None:
        """Mark a full, computed block as the cache entry for `digest` (first writer wins)."""
        if digest in self._block_of or block in self._hash_of:
            return
        self._hash_of[block] = digest
        self._tokens_of[block] = tuple(token_ids)
        self._block_of[digest] = block

    def _forget(self, block: int) -> None:
        digest = self._hash_of.pop(block)
        del self._tokens_of[block]
        del self._block_of[digest]
