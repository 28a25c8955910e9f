"""The engine loop's liveness: a stuck or dead loop with requests unfinished fails the health check,
an idle one never does, and a step that can do nothing does not make the loop spin."""

import asyncio
import time
from types import SimpleNamespace

import pytest

from deployments.engine.async_engine import AsyncEngine
from deployments.engine.engine import Engine
from deployments.engine.liveness import EngineStuck, Heartbeat, liveness_problem


def test_liveness_problem():
    ok = dict(has_work=True, loop_alive=True, seconds_since_progress=5, stuck_after_s=10)
    assert liveness_problem(**ok) is None
    assert liveness_problem(**ok | dict(has_work=False, loop_alive=False, seconds_since_progress=1e6)) is None
    assert "died" in liveness_problem(**ok | dict(loop_alive=False))
    assert "no engine step made progress for 11 s" in liveness_problem(**ok | dict(seconds_since_progress=11))


def test_heartbeat_with_a_fake_clock():
    now = [100.0]
    hb = Heartbeat(stuck_after_s=10, clock=lambda: now[0])
    now[0] = 109
    hb.check(has_work=True, loop_alive=True)
    now[0] = 111
    with pytest.raises(EngineStuck, match="no engine step made progress"):
        hb.check(has_work=True, loop_alive=True)
    hb.check(has_work=False, loop_alive=True)  # idle is healthy however long
    hb.beat()
    hb.check(has_work=True, loop_alive=True)


class StuckEngine:
    """An engine whose requests can never be scheduled (what the pinned-blocks deadlock looked like)."""

    lockstep = False  # its experts need no idle steps (Engine.lockstep)

    def __init__(self, stuck_after_s: float, max_waiting: int = 10):
        # one running slot, taken: every added request waits
        self.config = SimpleNamespace(stuck_after_s=stuck_after_s, max_waiting=max_waiting, max_num_seqs=1)
        self.scheduler = SimpleNamespace(waiting=[], running=["r0"])
        self.requests: set[str] = set()
        self.num_step_calls = 0

    check_queue = Engine.check_queue

    def add_request(self, prompt_ids, params, *, request_id, **kwargs):
        self.requests.add(request_id)
        return request_id

    def abort(self, request_id):
        return self.requests.discard(request_id) is None

    def has_unfinished(self):
        return bool(self.requests)

    def progress(self):
        return (0, 0)

    def step(self):
        self.num_step_calls += 1
        return []


def test_a_stuck_engine_neither_spins_nor_passes_the_health_check():
    async def scenario():
        engine = StuckEngine(stuck_after_s=0.3)
        async_engine = AsyncEngine(engine)  # type: ignore[arg-type]
        async_engine.check_health()  # idle, no loop yet: healthy
        stream = async_engine.generate("r1", [1, 2], None)  # type: ignore[arg-type]
        consumer = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0.1)
        async_engine.check_health()  # work just arrived
        await asyncio.sleep(0.5)
        assert engine.num_step_calls < 30  # ~0.6 s / idle_poll_s, not thousands
        with pytest.raises(EngineStuck, match="no engine step made progress"):
            async_engine.check_health()
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await stream.aclose()  # the request is aborted: idle again, healthy
        await asyncio.sleep(0.1)
        async_engine.check_health()
        async_engine._loop_task.cancel()

    asyncio.run(scenario())


def test_a_dead_loop_with_work_fails_the_health_check():
    async def scenario():
        engine = StuckEngine(stuck_after_s=100)
        async_engine = AsyncEngine(engine)  # type: ignore[arg-type]
        engine.requests.add("r1")
        async_engine._loop_task = asyncio.create_task(asyncio.sleep(0))
        await async_engine._loop_task
        with pytest.raises(EngineStuck, match="died"):
            async_engine.check_health()

    start = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - start < 5


def test_overload_is_refused_without_waiting_for_a_busy_engine_thread():
    """With engine.max_waiting requests waiting, a new one is refused at once (EngineOverloaded,
    429 / RESOURCE_EXHAUSTED) even while the engine thread is busy with a long step: the refusal
    used to be decided on that thread, behind the step."""
    import threading

    from deployments.engine.engine import EngineOverloaded

    release = threading.Event()

    class BusyEngine(StuckEngine):
        def step(self):
            release.wait(10)  # a long step holds the engine thread
            return []

    async def scenario():
        engine = BusyEngine(stuck_after_s=60, max_waiting=1)
        async_engine = AsyncEngine(engine)  # type: ignore[arg-type]
        first = async_engine.generate("r1", [1, 2], None)  # type: ignore[arg-type]
        consumer = asyncio.create_task(first.__anext__())
        await asyncio.sleep(0.2)  # r1 added; the loop is now inside the blocked step
        engine.scheduler.waiting.append("r1")
        with pytest.raises(EngineOverloaded, match="1 requests are already waiting"):
            await asyncio.wait_for(async_engine.generate("r2", [1], None).__anext__(), 2)  # type: ignore[arg-type]
        release.set()
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await first.aclose()
        async_engine._loop_task.cancel()

    asyncio.run(scenario())
