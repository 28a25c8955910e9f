"""Is the engine loop alive? The router service's `check_health` asks this (Ray Serve calls it
periodically and replaces a replica whose check raises).

The loop beats the `Heartbeat` whenever it makes progress (a step that ran something, or failed its
requests) and when work arrives after an idle spell. The engine is stuck when it has unfinished
requests and no beat came for `stuck_after_s`, or when its loop task has died. Pure: no Ray, no
asyncio; the clock is injectable.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class EngineStuck(RuntimeError):
    """The engine loop is dead or has made no progress for too long (the replica is unhealthy)."""


def liveness_problem(*, has_work: bool, loop_alive: bool, seconds_since_progress: float,
                     stuck_after_s: float) -> str | None:
    """Why the engine is unhealthy, or None if it is fine. An idle engine is always fine."""
    if not has_work:
        return None
    if not loop_alive:
        return "the engine loop has died with requests unfinished"
    if seconds_since_progress > stuck_after_s:
        return (f"no engine step made progress for {seconds_since_progress:.0f} s "
                f"(limit {stuck_after_s:g} s) with requests unfinished")
    return None


class Heartbeat:
    def __init__(self, stuck_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.stuck_after_s = stuck_after_s
        self.clock = clock
        self.last = clock()

    def beat(self) -> None:
        self.last = self.clock()

    def check(self, *, has_work: bool, loop_alive: bool) -> None:
        """Raise EngineStuck naming the problem; return if the engine is healthy."""
        problem = liveness_problem(has_work=has_work, loop_alive=loop_alive,
                                   seconds_since_progress=self.clock() - self.last, stuck_after_s=self.stuck_after_s)
        if problem is not None:
            raise EngineStuck(problem)
