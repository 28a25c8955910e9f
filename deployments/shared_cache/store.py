"""`RedisKVStore`: the router service's connection to the shared Redis, safe to lose.

Reads use `redis.asyncio` (hiredis parser) on the router service's event loop: one pipelined MGET per
lookup; on loopback it reads about 3 GB/s, against 1.6-1.8 GB/s for redis-py's blocking client
(bench/RESULTS.md). Writes run on one background thread with the blocking client, fed by a queue
bounded in bytes, so encoding and sending never touch the event loop or the engine thread. Every
operation has a timeout; failures open a circuit breaker for `cooldown_s`, during which the store
answers "unavailable" at once and serving goes on with the local cache; after the cooldown one
operation probes the server and, when it works, the breaker closes (reconnected).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from deployments.redis_address import RedisAddress, redact

log = logging.getLogger(__name__)


class Breaker:
    def __init__(self, failures_to_open: int = 2, cooldown_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.failures_to_open = failures_to_open
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        """Closed: yes. Open: only once the cooldown is over (that call probes the server)."""
        with self._lock:
            if self.opened_at is None:
                return True
            if self.clock() - self.opened_at >= self.cooldown_s:
                self.opened_at = self.clock()  # one probe per cooldown
                return True
            return False

    def success(self) -> bool:
        """Record a success; True if this closed an open breaker."""
        with self._lock:
            was_open = self.opened_at is not None
            self.failures, self.opened_at = 0, None
            return was_open

    def failure(self) -> bool:
        """Record a failure; True if this opened the breaker."""
        with self._lock:
            self.failures += 1
            if self.opened_at is None and self.failures >= self.failures_to_open:
                self.opened_at = self.clock()
                return True
            if self.opened_at is not None:
                self.opened_at = self.clock()
            return False


@dataclass
class StoreStats:
    bytes_read: int = 0
    bytes_written: int = 0
    writes_dropped: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class RedisKVStore:
    def __init__(self, url: str, password: str | None = None, *, timeout_s: float = 1.0, ttl_s: int = 86400,
                 max_inflight_bytes: int = 256 << 20, breaker: Breaker | None = None):
        self.address = RedisAddress.parse(url)
        self.url = redact(url)
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.max_inflight_bytes = max_inflight_bytes
        self.breaker = breaker or Breaker()
        self.stats = StoreStats()
        self.listeners: list[Callable[[bool], None]] = []  # called with False when Redis goes, True when back
        a = self.address
        # No client-side retries: failing fast is the breaker's job (retries back off for seconds).
        self._options = dict(host=a.host, port=a.port, db=a.db, password=password, ssl=a.tls, socket_timeout=timeout_s,
                             socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), retries=0))
        self._client = redis.Redis(**self._options)
        self._aclient: aioredis.Redis | None = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None
        self._writes: queue.Queue = queue.Queue()
        self._inflight = 0
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="herd-redis-write", daemon=True)
        self._writer.start()

    # ---- reads ------------------------------------------------------------------------------
    async def get_many(self, keys: list[str]) -> list[bytes | None] | None:
        """The values of `keys` (None for a missing key), or None when Redis is unavailable."""
        if not keys or not self.breaker.allow():
            return None
        return await self._guarded_async("get", lambda c: c.mget(keys))

    async def probe(self) -> None:
        """While the breaker is open, ping Redis once per cooldown (closing it when Redis is back)."""
        if self.breaker.is_open and self.breaker.allow():
            await self._guarded_async("ping", lambda c: c.ping())

    def get_many_blocking(self, keys: list[str]) -> list[bytes | None] | None:
        return self._guarded("get", lambda c: c.mget(keys)) if self.breaker.allow() else None

    # ---- writes -----------------------------------------------------------------------------
    def write_blocking(self, key: str, value: bytes, ttl_s: int) -> bool:
        return self._guarded("set", lambda c: c.set(key, value, ex=ttl_s)) is not None

    def can_write(self) -> bool:
        return self._inflight < self.max_inflight_bytes and not self.breaker.is_open

    def put(self, key: str, encode: Callable[[], bytes | bytearray], nbytes: int, done: Callable[[], None]) -> bool:
        """Queue a write (`encode` runs on the writer thread); False, counted, if over the byte budget."""
        with self._lock:
            if self._inflight + nbytes > self.max_inflight_bytes or self.breaker.is_open:
                self.stats.writes_dropped += 1
                return False
            self._inflight += nbytes
        self._writes.put((key, encode, nbytes, done))
        return True

    def _write_loop(self) -> None:
        """Write queued values until `close`. Nothing a write raises stops the thread: a Redis
        failure feeds the breaker (`_guarded`), anything else (a bug in encoding, a callback) is
        logged with its traceback, counted as `stats.errors["write_internal"]` (metric
        herd_redis_errors{op="write_internal"}), and the next write goes on."""
        while True:
            item = self._writes.get()
            if item is None:
                return
            key, encode, nbytes, done = item
            try:
                value = encode()
                if self.write_blocking(key, value, self.ttl_s):
                    self.stats.bytes_written += len(value)
                    done()
            except Exception:
                self.stats.errors["write_internal"] = self.stats.errors.get("write_internal", 0) + 1
                log.exception("a shared prefix-cache write failed (not a Redis error); skipped, the writer goes on")
            finally:
                with self._lock:
                    self._inflight -= nbytes

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until every queued write is done (tests, benchmarks, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        self._writes.put(None)
        self._client.close()

    # ---- connections, failures --------------------------------------------------------------
    def _async_client(self) -> aioredis.Redis:
        """The asyncio client of the running loop (an asyncio client belongs to one loop)."""
        loop = asyncio.get_running_loop()
        if self._aclient_loop is not loop:
            self._aclient, self._aclient_loop = aioredis.Redis(**self._options), loop
        return self._aclient

    async def _guarded_async(self, op: str, fn):
        try:
            result = await asyncio.wait_for(fn(self._async_client()), self.timeout_s * 4)
        except (TimeoutError, redis.RedisError, OSError) as e:
            return self._failed(op, e)
        return self._succeeded(op, result)

    def _guarded(self, op: str, fn):
        """Run `fn(client)`; on failure count it, feed the breaker, return None (the pool reconnects)."""
        try:
            result = fn(self._client)
        except (redis.RedisError, OSError) as e:
            return self._failed(op, e)
        return self._succeeded(op, result)

    def _failed(self, op: str, e: Exception) -> None:
        self.stats.errors[op] = self.stats.errors.get(op, 0) + 1
        if self.breaker.failure():
            log.warning("Redis at %s unavailable (%s: %r): serving from the local prefix cache only, "
                        "retrying every %.0f s", self.url, op, e, self.breaker.cooldown_s)
            self._notify(False)
        return None

    def _succeeded(self, op: str, result):
        if op == "get":
            self.stats.bytes_read += sum(len(v) for v in result if v is not None)
        if self.breaker.success():
            log.warning("Redis at %s is back: shared prefix cache on again", self.url)
            self._notify(True)
        return result if result is not None else True

    def _notify(self, up: bool) -> None:
        for listener in self.listeners:
            listener(up)
