"""`LRUCache`: a mapping of at most `maxsize` entries (or, with `weigh`, of entries weighing at most
`maxsize` together, e.g. bytes) that evicts the least recently used ones.

One implementation for the bounded LRUs of the deployments: the VisionEncoder's image embeddings,
the digests `SharedCache` knows Redis holds, and the prefix-affinity table's chunk and session maps.
Not thread-safe: a caller shared between threads holds its own lock (as `SharedCache` does).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar, overload

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")


class LRUCache(Generic[K, V]):
    """`get` and `put` make an entry the most recently used; `peek` and `in` do not. `put` beyond
    `maxsize` entries evicts the least recently used ones; `maxsize` 0 disables the cache (`put`
    stores nothing). With `weigh` (value -> its weight, e.g. bytes), `maxsize` bounds the total
    weight instead of the count, and a value heavier than `maxsize` alone is not stored."""

    def __init__(self, maxsize: int, weigh: Callable[[V], int] | None = None):
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0 (0 disables the cache), got {maxsize}")
        self.maxsize = maxsize
        self._weigh = weigh or (lambda _: 1)
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()  # (value, weight), least recently used first
        self.weight = 0  # of all entries

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
        return self._data[key][0]

    @overload
    def peek(self, key: K) -> V | None: ...
    @overload
    def peek(self, key: K, default: T) -> V | T: ...

    def peek(self, key, default=None):
        """The value of `key` without touching its recency; `default` if absent."""
        entry = self._data.get(key)
        return default if entry is None else entry[0]

    def put(self, key: K, value: V) -> None:
        """Store (or replace) `key` as the most recently used entry, then evict the least recently
        used ones beyond `maxsize` (count or weight)."""
        weight = self._weigh(value)
        old = self._data.pop(key, None)
        if old is not None:
            self.weight -= old[1]
        if weight > self.maxsize:
            return
        self._data[key] = (value, weight)
        self.weight += weight
        while self.weight > self.maxsize:
            _, (_, w) = self._data.popitem(last=False)
            self.weight -= w

    def clear(self) -> None:
        self._data.clear()
        self.weight = 0

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        """Keys from the least to the most recently used."""
        return iter(self._data)
