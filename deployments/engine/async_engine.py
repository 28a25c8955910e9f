"""`AsyncEngine`: the engine behind an asyncio front end (a Serve replica). All engine calls run
on one worker thread, so the event loop never blocks on a step and the engine needs no locks;
each request gets a queue its caller drains as an async iterator.

The loop never spins: a step that could not move any request forward waits for the next request or
abort (at most `idle_poll_s`) before trying again. `check_health` (the router service's health
check) raises `EngineStuck` when requests are unfinished and the loop died or made no progress for
`EngineConfig.stuck_after_s` (deployments/engine/liveness.py).

An expert backend that fails under a batch (`BatchUnavailable`) fails that batch's requests with
EngineStepError (UNAVAILABLE); while it cannot begin a step (`ExpertBackendNotReady`: a shard
restarts, the group re-forms) every request keeps its place for `EngineConfig.expert_wait_s`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from deployments.engine.engine import NOT_READY_RETRY_S, BatchUnavailable, Engine
from deployments.engine.experts import ExpertBackendNotReady
from deployments.engine.kv_transfer import KVChunk
from deployments.engine.liveness import Heartbeat
from deployments.engine.output import RequestOutput
from deployments.engine.params import SamplingParams
from deployments.engine.sequence import ImageInput
from model.errors import InvalidInputError

log = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """A step failed (e.g. an expert shard died); the requests in it were aborted."""


class RequestFailed(RuntimeError):
    """This request alone broke an engine step and was stopped (the others in the step carried on);
    the message says what it raised."""


class AsyncEngine:
    idle_poll_s = 0.05  # a step that could do nothing waits this long (or for a new request / abort)
    lockstep_retry_s = NOT_READY_RETRY_S  # a lockstep engine whose (idle) step could not begin retries this late

    def __init__(self, engine: Engine):
        self.engine = engine
        self.heartbeat = Heartbeat(engine.config.stuck_after_s)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="herd-engine")
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._idle = True  # the loop waits for work: no progress is due
        self._unavailable_since: float | None = None  # when the expert backend stopped beginning steps

    async def _call(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: fn(*args, **kwargs))

    async def generate(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams, *,
                       images: Sequence[ImageInput] = (), cache_salt: str = "",
                       shared_chunks: Sequence[KVChunk] = (),
                       num_shared_chunks: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iterator early cancels the request.

        `request_id` must not be running already: a duplicate raises InvalidInputError and leaves the
        running request alone (its queue, its engine state). Front ends that take ids from clients
        should not pass them here (the Ingress gives every request its own engine id)."""
        if request_id in self._queues:  # checked and claimed with no await in between
            raise InvalidInputError(f"request_id {request_id!r} is already running")
        self.check_admission()
        self.start()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        added = finished = False
        try:
            await self._call(self.engine.add_request, prompt_ids, params, request_id=request_id,
                             images=images, cache_salt=cache_salt, shared_chunks=shared_chunks,
                             num_shared_chunks=num_shared_chunks)
            added = True
            if self._idle:  # work arrived: the time to progress counts from now
                self.heartbeat.beat()
                self._idle = False
            self._wake.set()
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailed(f"request {request_id} failed in the engine and was stopped: {item.error}")
                yield item
        finally:
            if self._queues.get(request_id) is queue:
                del self._queues[request_id]
            if added and not finished:
                await self._call(self.engine.abort, request_id)
                self._wake.set()  # freed blocks may let a waiting request start

    def start(self) -> None:
        """Start the engine loop now (called from the event loop). A lockstep engine must step from the
        start, work or not: the other members of its expert group wait for it."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run())

    def check_admission(self) -> None:
        """EngineOverloaded at once when engine.max_waiting requests wait already: read off the engine
        thread (which may be busy with a step), so a fast refusal; add_request checks again there."""
        self.engine.check_queue()

    async def _run(self) -> None:
        lockstep = self.engine.lockstep
        while True:
            if not lockstep:
                await self._wake.wait()
            if not await self._call(self.engine.has_unfinished):
                self._wake.clear()
                self._idle = True
                if lockstep:
                    try:
                        await self._call(self.engine.idle)
                    except Exception as e:
                        log.warning("idle step of the expert backend failed (retrying in %.1f s): %s",
                                    self.lockstep_retry_s, e)
                        await asyncio.sleep(self.lockstep_retry_s)
                continue
            self._idle = False
            before = self.engine.progress()
            try:
                outputs = await self._call(self.engine.step)
            except ExpertBackendNotReady as e:  # nothing ran: wait for the backend (bounded), keep serving
                await self._wait_for_experts(e)
                continue
            except BatchUnavailable as e:  # the backend failed under this batch: its requests were in flight
                await self._fail(e.request_ids, e)
                self.heartbeat.beat()
                continue
            except Exception as e:  # fail the requests in flight, keep serving
                await self._fail(list(self._queues), e)
                self.heartbeat.beat()
                continue
            self._unavailable_since = None
            if self.engine.progress() != before:
                self.heartbeat.beat()
            elif not lockstep:  # nothing could run: do not spin; a new request or an abort may change that
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.idle_poll_s)
                except TimeoutError:
                    self._wake.set()
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

    async def _wait_for_experts(self, error: ExpertBackendNotReady) -> None:
        """No step can begin until the expert backend is back (a shard restarts, the group re-forms):
        requests keep their places for `engine.expert_wait_s` from the start of the outage, then fail
        with UNAVAILABLE (and later ones at once) until a step runs again."""
        now = time.monotonic()
        if self._unavailable_since is None:
            self._unavailable_since = now
            log.warning("the expert backend cannot run a step (%s); requests wait up to %.0f s for it",
                        error, self.engine.config.expert_wait_s)
        if now - self._unavailable_since >= self.engine.config.expert_wait_s and self._queues:
            await self._fail(list(self._queues), error)
        self.heartbeat.beat()  # waiting on the backend, not stuck: Serve must not replace this replica for it
        await asyncio.sleep(self.lockstep_retry_s)

    async def _fail(self, request_ids: list[str], error: Exception) -> None:
        """Abort `request_ids` and end their streams with EngineStepError (UNAVAILABLE to clients)."""
        log.error("engine step failed, aborting %d requests: %s", len(request_ids), error)
        for request_id in request_ids:
            await self._call(self.engine.abort, request_id)
            queue = self._queues.get(request_id)
            if queue is not None:
                wrapped = EngineStepError(f"request {request_id} failed: {error}")
                wrapped.__cause__ = error
                queue.put_nowait(wrapped)

    def check_health(self) -> None:
        """Raise EngineStuck when requests are unfinished and the loop died or stopped progressing."""
        loop_alive = self._loop_task is not None and not self._loop_task.done()
        self.heartbeat.check(has_work=self.engine.has_unfinished(), loop_alive=loop_alive)

    def expert_tokens(self) -> list[int]:
        """Tokens routed to each expert since start (all MoE layers)."""
        return self.engine.runner.expert_tokens.tolist()

    def stats(self) -> dict[str, int]:
        """Scheduler and KV occupancy (read without the engine thread: approximate)."""
        e = self.engine
        stats = {"running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting)}
        for name, pool in e.kv.pools.items():
            stats[f"kv_{name}_used"] = pool.num_used
            stats[f"kv_{name}_free"] = pool.num_free
        return stats
