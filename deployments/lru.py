"""`LRUCache`: a mapping of at most `maxsize` entries that evicts the least recently used one.

One implementation for the bounded LRUs of the deployments: the VisionEncoder's image embeddings,
the digests `SharedCache` knows Redis holds, and the prefix-affinity table's chunk and session maps.
Not thread-safe: a caller shared between threads holds its own lock (as `SharedCache` does).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar, overload

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")


class LRUCache(Generic[K, V]):
    """`get` and `put` make an entry the most recently used; `peek` and `in` do not. `put` beyond
    `maxsize` entries evicts the least recently used ones; `maxsize` 0 disables the cache (`put`
    stores nothing)."""

    def __init__(self, maxsize: int):
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0 (0 disables the cache), got {maxsize}")
        self.maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()  # least recently used first

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: T) -> V | T: ...

    def get(self, key, default=None):
        """The value of `key`, now the most recently used; `default` if absent."""
        try:
            self._data.move_to_end(key)
        except KeyError:
            return default
        return self._data[key]

    @overload
    def peek(self, key: K) -> V | None: ...
    @overload
    def peek(self, key: K, default: T) -> V | T: ...

    def peek(self, key, default=None):
        """The value of `key` without touching its recency; `default` if absent."""
        return self._data.get(key, default)

    def put(self, key: K, value: V) -> None:
        """Store (or replace) `key` as the most recently used entry, then evict the least recently
        used ones beyond `maxsize`."""
        if self.maxsize == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        """Keys from the least to the most recently used."""
        return iter(self._data)
