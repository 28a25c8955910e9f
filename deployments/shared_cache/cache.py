"""`SharedCache`: the shared Redis prefix cache as seen by one router-service replica.

Before a request is queued, `lookup` asks the engine which leading prompt chunks its local prefix
cache already holds, then fetches the following chunks from Redis in one pipelined read (on a
worker thread, while the engine keeps stepping), checks every value (codec.decode) and hands the
good leading run to the engine, which loads it into the paged cache: only what is missing is
prefilled. As the engine computes new prompt chunks it offers them here (`put`, the SharedCacheWriter
contract); they are encoded and written on a background thread, never blocking decode.

Fetching pays only when moving a chunk's bytes is faster than recomputing its tokens: `FetchCost`
compares the measured load bandwidth with the measured prefill speed and skips Redis when
recomputing wins (policy "auto"; "always" / "never" force it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Literal

from deployments.auth import is_private_salt
from deployments.engine.kv_transfer import KVChunk
from deployments.engine.sequence import ImageInput, Sequence
from deployments.lru import LRUCache
from deployments.shared_cache.codec import CorruptChunk, Namespace, decode, encode
from deployments.shared_cache.store import RedisKVStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchCost:
    policy: Literal["auto", "always", "never"]
    load_bytes_per_s: float
    prefill_tokens_per_s: float
    bytes_per_token: float
    round_trip_s: float = 0.0005

    def worth_fetching(self, num_tokens: int) -> bool:
        if self.policy != "auto":
            return self.policy == "always"
        fetch = self.round_trip_s + num_tokens * self.bytes_per_token / self.load_bytes_per_s
        return fetch < num_tokens / self.prefill_tokens_per_s


@dataclass
class SharedCacheStats:
    """Counters of this replica (also exported as Ray metrics by the Router)."""

    lookups: int = 0
    hit_chunks: int = 0
    miss_chunks: int = 0
    skipped: int = 0  # lookups not sent: recomputing was faster, or Redis is down
    integrity_failures: dict[str, int] = field(default_factory=dict)
    fetch_seconds: list[float] = field(default_factory=list)


class SharedCache:
    def __init__(self, store: RedisKVStore, ns: Namespace, cost: FetchCost, known_capacity: int = 65536,
                 batch_chunks: int = 16):
        self.store = store
        self.ns = ns
        self.cost = cost
        self.chunk_tokens = ns.layout.chunk_tokens
        self.batch_chunks = batch_chunks
        self.stats = SharedCacheStats()
        self._known: LRUCache[bytes, None] = LRUCache(known_capacity)  # digests Redis holds (read or written here)
        self._lock = threading.Lock()
        store.listeners.append(lambda up: self.forget_known() if up else None)  # a restarted Redis may be empty

    # ---- reads ------------------------------------------------------------------------------
    async def lookup(self, engine, prompt_ids: Seq[int], images: Seq[ImageInput] = (),
                     cache_salt: str = "") -> tuple[list[KVChunk], int]:
        """Chunks to load after the local prefix, and how many leading chunks Redis is known to hold."""
        if is_private_salt(cache_salt):  # an anonymous request's own namespace: nothing to share
            return [], 0
        try:
            digests, local = await asyncio.to_thread(engine.prefix_chunks, prompt_ids, images, cache_salt)
        except Exception:  # a malformed request: the engine rejects it with a clear error
            return [], 0
        wanted, chunks = digests[local:], []
        if wanted:
            self.stats.lookups += 1
            start = time.perf_counter()
            worth = self.cost.worth_fetching(len(wanted) * self.chunk_tokens)
            fetched = await self.fetch(wanted, local) if worth else None
            if fetched is None:  # recomputing is faster, or Redis is unavailable
                self.stats.skipped += 1
            else:
                chunks = fetched
                self.stats.fetch_seconds.append(time.perf_counter() - start)
        return chunks, self._known_run(digests)

    async def fetch(self, digests: list[bytes], first_index: int) -> list[KVChunk] | None:
        """The leading run of good chunks among `digests` (chunk numbers from `first_index`); None
        if Redis is unavailable. Batches of `batch_chunks` are pipelined (batch k+1 is requested
        before batch k is checked, so Redis sends while we check), and a miss or a bad value stops
        the reads there. Checking runs inline: on a worker thread it measured slower (GIL)."""
        batches = [digests[i : i + self.batch_chunks] for i in range(0, len(digests), self.batch_chunks)]
        read = lambda batch: asyncio.ensure_future(self.store.get_many([self.ns.key(d) for d in batch]))  # noqa: E731
        chunks: list[KVChunk] = []
        pending = read(batches[0])
        for n, batch in enumerate(batches):
            values = await pending
            if values is None:
                return chunks or None
            pending = read(batches[n + 1]) if n + 1 < len(batches) else None
            good = self._decode_run(batch, values, first_index + len(chunks))
            chunks += good
            if len(good) < len(batch):
                break
        if pending is not None:
            pending.cancel()
        self.stats.miss_chunks += len(digests) - len(chunks)
        return chunks

    def _decode_run(self, digests: list[bytes], values: list, first_index: int) -> list[KVChunk]:
        chunks = []
        for n, (digest, value) in enumerate(zip(digests, values, strict=False)):
            if value is None:
                break
            try:
                chunks.append(decode(self.ns, value, digest, first_index + n))
            except CorruptChunk as e:
                self.stats.integrity_failures[e.reason] = self.stats.integrity_failures.get(e.reason, 0) + 1
                log.warning("ignoring a bad prefix-cache value (%s)", e)
                break
            self._remember(digest)
        self.stats.hit_chunks += len(chunks)
        return chunks

    # ---- writes (SharedCacheWriter, called on the engine thread) ----------------------------------------
    def ready(self) -> bool:
        return self.store.can_write()

    def put(self, seq: Sequence, chunk: KVChunk) -> None:
        if is_private_salt(seq.cache_salt):  # no request could ever read it
            return
        with self._lock:
            if chunk.digest in self._known:
                return
        self.store.put(self.ns.key(chunk.digest), lambda: encode(self.ns, chunk), chunk.nbytes,
                       lambda: self._remember(chunk.digest))

    # ---- what Redis is known to hold ---------------------------------------------------------
    def _remember(self, digest: bytes) -> None:
        with self._lock:
            self._known.put(digest, None)

    def forget_known(self) -> None:
        with self._lock:
            self._known.clear()

    def _known_run(self, digests: list[bytes]) -> int:
        with self._lock:
            n = 0
            while n < len(digests) and digests[n] in self._known:
                n += 1
            return n
