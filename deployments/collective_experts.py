"""`CollectiveExperts`: the engine's expert backend over the expert group (deployments/expert_group.py).

Runs on the engine thread (and, with two micro-batches, on the runner's second thread). Each engine
forward pass is one group step (`step()`); an engine with nothing to run still takes part in the
group's steps (`idle()`), so replicas with work never wait on one without. When the group fails
(a shard or a replica died, a timeout) the step raises `ExpertsUnavailable` (its requests fail
with UNAVAILABLE) and the next step asks the pool for the next generation (`join`) and forms it.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from deployments.expert_group import (
    HEADER,
    REQUEST_TAG,
    ExpertGroup,
    ExpertsNotReady,
    ExpertsUnavailable,
    GroupError,
    GroupSpec,
    GroupSuperseded,
    Message,
    Wire,
)

log = logging.getLogger(__name__)


# On the CPU, batches of up to this many rows are routed to the shards in Python from one `tolist()`:
# the mask, `any` and `nonzero` per shard cost more there (measured: ~0.1 ms of the replica's ~0.25 ms
# side of a batch-1 exchange, bench/RESULTS.md).
HOST_ROUTING_MAX_ROWS = 16


def rows_by_shard(ids: torch.Tensor, shards: tuple[tuple[int, int], ...]) -> list[tuple[int, torch.Tensor | None]]:
    """For each shard (expert range [start, stop)): how many rows of `ids` `[T, k]` chose an expert
    there, and which (int64 indices, ascending; None when that is every row)."""
    t = ids.shape[0]
    if ids.device.type == "cpu" and t <= HOST_ROUTING_MAX_ROWS:
        starts = [start for start, _ in shards]
        rows: list[list[int]] = [[] for _ in shards]
        for i, row in enumerate(ids.tolist()):
            for e in row:
                s = bisect.bisect_right(starts, e) - 1
                if s >= 0 and e < shards[s][1] and (not rows[s] or rows[s][-1] != i):
                    rows[s].append(i)
        return [(len(r), None if len(r) == t else torch.tensor(r, dtype=torch.long)) for r in rows]
    routed: list[tuple[int, torch.Tensor | None]] = []
    for start, stop in shards:
        idx = ((ids >= start) & (ids < stop)).any(dim=1).nonzero().squeeze(1)
        n = idx.numel()
        routed.append((n, None if n == t else idx))
    return routed


@dataclass
class ReplicaStats:
    generation: int = -1
    reforms: int = 0  # groups formed after the first
    failures: int = 0  # steps failed by the group
    steps: int = 0
    idle_steps: int = 0
    wait_s: list[float] = field(default_factory=list)  # per exchange: time blocked on the shards' replies
    rows_sent: dict[int, int] = field(default_factory=dict)  # shard -> rows sent to it (all layers)

    def record_wait(self, seconds: float) -> None:
        if len(self.wait_s) < 10_000:
            self.wait_s.append(seconds)


class _Step:
    """One group step of this replica: exchanges in the group's order (layer-major, then micro-batch),
    whichever thread runs which micro-batch; a micro-batch that ends (or fails) early sends empty
    batches for the layers it has left, so the group stays in lockstep."""

    def __init__(self, owner: CollectiveExperts, group: ExpertGroup):
        self.owner, self.group = owner, group
        self.mbs = group.spec.micro_batches
        self.layer_pos = {layer: i for i, layer in enumerate(group.spec.moe_layers)}
        self.total = len(group.spec.moe_layers) * self.mbs
        self.turn = 0
        self.done: set[int] = set()
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def _skip_done(self) -> None:
        while self.turn < self.total and self.turn % self.mbs in self.done:
            layer = self.group.spec.moe_layers[self.turn // self.mbs]
            self.owner._post(self.group, layer, self.turn % self.mbs, None)
            self.turn += 1

    def exchange(self, mb: int, layer: int, x, ids, scores) -> torch.Tensor:
        t = self.layer_pos[layer] * self.mbs + mb
        with self.cond:
            while self.turn != t and self.error is None:
                if self.turn > t or not self.cond.wait(self.group.spec.timeout_s):
                    self.error = GroupError(f"micro-batch {mb} lost its turn at MoE layer {layer}")
            if self.error is not None:
                raise ExpertsUnavailable(f"expert group step failed: {self.error}")
            try:
                posted = self.owner._post(self.group, layer, mb, (x, ids, scores))
                self.turn += 1
                self._skip_done()
            except GroupError as e:
                self.error = e
                raise
            finally:
                self.cond.notify_all()
        return self.owner._complete(self.group, layer, x, posted)

    def finish(self, mb: int) -> None:
        with self.cond:
            self.done.add(mb)
            if self.error is None:
                try:
                    self._skip_done()
                except GroupError as e:
                    self.error = e
            self.cond.notify_all()


class CollectiveExperts:
    """`ExpertBackend` for a router-service replica in the expert group.

    `join(after_generation)` returns the spec of a generation newer than `after_generation` that
    includes this replica (the pool's `join`; raises ExpertsUnavailable while it cannot)."""

    lockstep = True

    def __init__(self, join: Callable[[int], GroupSpec], replica_id: str, device: torch.device | str = "cpu",
                 idle_poll_s: float = 0.02):
        self.join = join
        self.replica_id = replica_id
        self.device = torch.device(device)
        self.idle_poll_s = idle_poll_s
        self.group: ExpertGroup | None = None
        self.last_generation = -1
        self.stats = ReplicaStats()
        self._step: _Step | None = None
        self._local = threading.local()
        self._send: list[list[Message]] = []  # [micro-batch][shard]

    # ---- group membership ----------------------------------------------------------------
    @property
    def micro_batches(self) -> int:
        return self.group.spec.micro_batches if self.group is not None else 1

    def _connect(self) -> ExpertGroup:
        for attempt in range(3):
            spec = self.join(self.last_generation)
            try:
                group = ExpertGroup(spec, spec.replica_rank(self.replica_id), self.device)
                break
            except GroupSuperseded as e:  # replicas joining at once: the newest generation has everyone
                self.last_generation = spec.generation
                if attempt == 2:
                    raise ExpertsUnavailable(str(e)) from e
            except GroupError as e:
                self.last_generation = spec.generation
                raise ExpertsUnavailable(str(e)) from e
        if self.stats.generation >= 0:
            self.stats.reforms += 1
        self.stats.generation = self.last_generation = spec.generation
        wire = Wire(spec)
        self._send = [[Message(wire, self.device) for _ in spec.shards] for _ in range(spec.micro_batches)]
        self.group = group
        return group

    def _break(self, error: BaseException) -> None:
        """The group failed: leave it (our peers fail at once too); the next step joins a newer one."""
        if self.group is not None:
            log.warning("expert group generation %d failed: %s", self.group.spec.generation, error)
            self.group.close(error)
            self.group = None
        self.stats.failures += 1

    def _begin(self, active: bool) -> tuple[ExpertGroup, list[int]]:
        """Join (or re-form) the group and begin a step; ExpertsNotReady when no step can begin: nothing
        of this step ran yet, so its requests are not lost (the engine tries again)."""
        for _ in range(3):
            try:
                group = self.group or self._connect()
            except ExpertsUnavailable as e:
                raise ExpertsNotReady(str(e)) from e
            try:
                replicas, reform = group.begin(active=active)
            except GroupError as e:
                self._break(e)
                raise ExpertsNotReady(f"expert group unavailable: {e}") from e
            if not reform:
                return group, replicas
            log.info("expert group generation %d: re-forming", group.spec.generation)
            group.close()  # everyone leaves at this step boundary: nothing fails
            self.group = None
        raise ExpertsNotReady("the expert group re-formed three times in a row")

    # ---- the engine's side -------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One engine forward pass = one group step (raises ExpertsUnavailable when the group cannot run it)."""
        group, _ = self._begin(active=True)
        step = self._step = _Step(self, group)
        self.stats.steps += 1
        try:
            yield
        finally:
            self._step = None
            for mb in range(step.mbs):
                step.finish(mb)
            if step.error is not None:
                self._break(step.error)
                raise ExpertsUnavailable(f"expert group step failed: {step.error}") from step.error

    @contextlib.contextmanager
    def micro_batch(self, mb: int) -> Iterator[None]:
        """Run (in this thread) the model over micro-batch `mb` of the current step."""
        self._local.mb = mb
        try:
            yield
        finally:
            self._local.mb = 0
            if self._step is not None:
                self._step.finish(mb)

    def idle(self) -> None:
        """Take part in one group step with no rows; sleep a little when no replica has work."""
        _, replicas = self._begin(active=False)
        self.stats.idle_steps += 1
        if not replicas:
            time.sleep(self.idle_poll_s)

    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = self._step
        if step is None:
            raise RuntimeError("CollectiveExperts.run outside step(): the engine runner opens one per forward pass")
        try:
            return step.exchange(getattr(self._local, "mb", 0), layer, x, expert_ids, scores)
        except GroupError as e:
            step.error = step.error or e
            raise ExpertsUnavailable(f"expert group failed at MoE layer {layer}: {e}") from e

    # ---- one exchange ------------------------------------------------------------------------
    @torch.inference_mode()
    def _post(self, group: ExpertGroup, layer: int, mb: int, rows) -> list:
        """Send each shard its rows of `layer` (`rows` None: none), post the receives of the replies.
        In a step this replica runs alone a shard gets a message only when it has rows, or at the
        last turn (layer, micro-batch) of the step, which ends the step for it."""
        spec = group.spec
        nccl = spec.backend == "nccl"
        solo = len(group.active) == 1
        last = solo and layer == spec.moe_layers[-1] and mb == spec.micro_batches - 1
        routed = [(0, None)] * len(spec.shards) if rows is None else rows_by_shard(rows[1], spec.shards)
        posted, sends = [], []
        for s, (n, idx) in enumerate(routed):
            msg = self._send[mb][s]
            if n > msg.wire.capacity:
                raise GroupError(f"{n} rows for one shard exceed the group's capacity of {msg.wire.capacity}")
            if n:
                self.stats.rows_sent[s] = self.stats.rows_sent.get(s, 0) + n
            if solo and not n and not last:
                continue
            if n and not nccl:  # the receive first: gloo tells the shard, and its reply goes out at once
                reply = torch.empty(n, spec.hidden_size, dtype=spec.dtype, device=self.device)
                posted.append((idx, reply, group.recv(reply, s, mb)))
            msg.write_header(n, layer, group.steps, mb)
            if n:
                x, ids, scores = rows
                xv, iv, sv = msg.views(n)
                if idx is None:  # every row, in order
                    xv.copy_(x)
                    iv.copy_(ids)
                    sv.copy_(scores)
                else:
                    torch.index_select(x, 0, idx, out=xv)
                    iv.copy_(ids.index_select(0, idx))
                    sv.copy_(scores.index_select(0, idx))
            if nccl:
                sends.append(group.send(msg.header, s, REQUEST_TAG))
                if n:
                    sends.append(group.send(msg.used(n)[HEADER * 8 :], s, REQUEST_TAG))
            else:
                sends.append(group.send(msg.used(n), s, REQUEST_TAG))
            if n and nccl:  # after the send: on NCCL a receive from a peer would hold up the send to it
                reply = torch.empty(n, spec.hidden_size, dtype=spec.dtype, device=self.device)
                posted.append((idx, reply, group.recv(reply, s, mb)))
        for w in sends:
            group.wait(w, f"sending rows of MoE layer {layer}")
        return posted

    @torch.inference_mode()
    def _complete(self, group: ExpertGroup, layer: int, x: torch.Tensor, posted: list) -> torch.Tensor:
        t0 = time.perf_counter()
        out = None
        for idx, reply, recv in posted:
            group.wait(recv, f"waiting for the experts of MoE layer {layer}")
            if out is None and idx is None:  # this shard had every row, in order
                out = reply
            elif out is None:
                out = torch.zeros_like(x).index_copy_(0, idx, reply)
            elif idx is None:  # every row, some of them also on other shards: sum the parts
                out.add_(reply)
            else:  # rows whose experts sit on several shards: sum the parts
                out.index_copy_(0, idx, out.index_select(0, idx).add_(reply))
        self.stats.record_wait(time.perf_counter() - t0)
        return torch.zeros_like(x) if out is None else out

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
