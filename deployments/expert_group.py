"""The expert group: M router-service (engine) replicas and N expert shards stepping in lockstep,
their messages over one of three backends: `socket` (TCP connections between every pair of
members, deployments/socket_mesh.py: the CPU's), `nccl` (a `torch.distributed` NCCL group: GPUs')
or `gloo` (a `torch.distributed` gloo group: the NCCL code path on the CPU, 2-3x the socket
backend's round trip). No tensor goes through Ray.

Ranks: shards 0..N-1, replicas N..N+M-1. The `ExpertPool` actor (deployments/expert_shard.py) hosts
the rendezvous `TCPStore`, hands out the `GroupSpec` (ranks, address, generation, backend) and makes
a new generation when a member dies, restarts, joins or leaves. A member forms its own connections
(`SocketMesh`, or a `ProcessGroupGloo`/`ProcessGroupNCCL` object) on a `PrefixStore` of that
generation, so one process can leave a group and form the next one (the default group of
`init_process_group` could not).

One group step (one forward pass of the replicas that have work):
1. `begin`: every member learns `[active flag of each replica..., re-form requested]` (each member
   sends its flags to every other one, one hop; on NCCL an all-reduce). Every member learns
   which replicas take part; a shard told of a newer generation by the pool raises the re-form flag
   and everyone leaves the group at this step boundary (no request fails).
2. For each MoE layer, for each micro-batch (a "turn"): every active replica sends each shard one
   message, `header | hidden rows | expert ids | gate scores` (int64 x4 | model dtype | int32 | fp32,
   each array in its own dtype, laid out one after the other in a fixed-capacity byte buffer; only
   the used prefix is sent; possibly no rows). Each shard runs its experts once on the union of the
   rows of all active replicas and sends each replica its part back. When one replica runs the step
   alone there is no union to wait for: it sends a shard a message only for the turns it has rows for
   there, plus the last turn (possibly empty), which ends the step for that shard.
One message each way per (replica, shard, turn): a message costs a syscall and a wake-up of its
receiver (on gloo two: its I/O thread, then the waiting one; gloo's receiver also tells the sender
when a receive is posted). Receivers on sockets and NCCL read the header first, then the rows it
announces; on gloo a receive takes a message of any size up to the buffer's.

Every wait has a timeout (`GroupSpec.timeout_s`); a member that dies closes its sockets, so its
peers fail at once ("connection closed by peer") rather than at the timeout. A member that fails
closes its group, which fails the members waiting on it in turn: the whole group fails fast.
"""

from __future__ import annotations

import datetime
import logging
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from deployments.engine.experts import ExpertBackendNotReady, ExpertBackendUnavailable
from deployments.socket_mesh import SocketMesh

log = logging.getLogger(__name__)

HEADER = 4  # int64: rows, layer, step number, micro-batch
REQUEST_TAG = 0  # replica -> shard messages (in the group's order); replies are tagged with their micro-batch
BEGIN_TAG = 7  # the step-begin flags (gloo, sockets)
IDS_DTYPE = torch.int32
SCORES_DTYPE = torch.float32
_ALIGN = 16
# Up to this many (row, expert choice) pairs, a CPU shard runs each pair through its expert on its own
# (`Experts.forward_rows`) instead of the sorted batch (`Experts.forward`): a batch-1 MoE layer's
# experts took ~0.31 ms in a shard that way on the 2-core CPU, ~0.2 ms this way (bench/RESULTS.md).
FEW_ROWS = 8


class ExpertsUnavailable(ExpertBackendUnavailable):
    """The expert shards cannot run this step: a member of the group died, restarts or timed out,
    or the group is re-forming. The step's requests fail with UNAVAILABLE; later steps retry."""


class ExpertsNotReady(ExpertsUnavailable, ExpertBackendNotReady):
    """No step could begin: the group is not formed yet or re-forms (a shard restarts, a replica
    joins). Nothing ran; the engine keeps its requests waiting (`engine.expert_wait_s`)."""


class GroupError(RuntimeError):
    """A collective of the expert group failed or timed out; the group is unusable (form the next one)."""


class GroupSuperseded(GroupError):
    """The pool handed out a newer generation while this one was forming: join that one."""


def drop_frames(error: BaseException) -> None:
    """Clear the locals of the finished frames of `error` and of its causes (they hold the group's
    pending `Work`s, which keep its connections open)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__


@dataclass(frozen=True)
class GroupSpec:
    """One generation of the expert group, as the pool hands it out."""

    generation: int
    host: str  # the pool's TCPStore
    port: int
    shards: tuple[tuple[int, int], ...]  # expert range (start, stop) of shard rank i
    replicas: tuple[str, ...]  # replica ids; replica i has rank len(shards) + i
    moe_layers: tuple[int, ...]
    hidden_size: int
    top_k: int
    capacity: int  # rows a replica sends one shard per exchange, at most
    dtype: torch.dtype  # the hidden states' (the engines' model dtype)
    micro_batches: int = 1
    timeout_s: float = 30.0
    backend: str = "socket"  # socket | gloo | nccl (the module's docstring)

    @property
    def world_size(self) -> int:
        return len(self.shards) + len(self.replicas)

    def replica_rank(self, replica_id: str) -> int:
        return len(self.shards) + self.replicas.index(replica_id)


LATEST = "herd-expert-group/latest"


def publish_generation(store, generation: int) -> None:
    """Tell the members on `store` (the pool's) that `generation` is the newest one."""
    store.set(LATEST, str(generation))


def latest_generation(store) -> int:
    return int(store.get(LATEST)) if store.check([LATEST]) else -1


class Wire:
    """Layout of one replica -> shard message in a byte buffer: header, x, ids, scores."""

    def __init__(self, spec: GroupSpec):
        self.hidden, self.k, self.dtype = spec.hidden_size, spec.top_k, spec.dtype
        self.itemsize = torch.empty(0, dtype=spec.dtype).element_size()
        self.capacity = spec.capacity
        self.max_bytes = self.nbytes(spec.capacity)

    def _offsets(self, n: int) -> tuple[int, int, int, int]:
        def up(v: int) -> int:
            return (v + _ALIGN - 1) // _ALIGN * _ALIGN

        x = up(HEADER * 8)
        ids = up(x + n * self.hidden * self.itemsize)
        scores = up(ids + n * self.k * 4)
        return x, ids, scores, up(scores + n * self.k * 4)

    def nbytes(self, n: int) -> int:
        return self._offsets(n)[3]

    def buffer(self, device: torch.device | str) -> torch.Tensor:
        return torch.empty(self.max_bytes, dtype=torch.uint8, device=device)

    def header(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[: HEADER * 8].view(torch.int64)

    def views(self, buf: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x `[n, hidden]`, ids `[n, k]` int32, scores `[n, k]` fp32) inside `buf`."""
        x, ids, scores, end = self._offsets(n)
        return (buf[x : x + n * self.hidden * self.itemsize].view(self.dtype).view(n, self.hidden),
                buf[ids : ids + n * self.k * 4].view(IDS_DTYPE).view(n, self.k),
                buf[scores : scores + n * self.k * 4].view(SCORES_DTYPE).view(n, self.k))


class Message:
    """One fixed-capacity message buffer (`Wire` layout) and its views, made once: on the CPU the
    header is read and written through a numpy view of the buffer, and the array views of the row
    counts seen are kept (a batch-1 exchange is a handful of tensor ops; each one counts)."""

    MAX_KEPT_VIEWS = 64

    def __init__(self, wire: Wire, device: torch.device | str):
        self.wire = wire
        self.buf = wire.buffer(device)
        self.header = wire.header(self.buf)
        self._host_header = self.header.numpy() if self.buf.device.type == "cpu" else None
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def write_header(self, rows: int, layer: int, step: int, micro_batch: int) -> None:
        if self._host_header is not None:
            self._host_header[:] = (rows, layer, step, micro_batch)
        else:
            self.header.copy_(torch.tensor([rows, layer, step, micro_batch], dtype=torch.int64))

    def read_header(self) -> list[int]:
        """[rows, layer, step, micro-batch]."""
        return (self._host_header if self._host_header is not None else self.header).tolist()

    def views(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x `[n, hidden]`, ids `[n, k]`, scores `[n, k]`) inside the buffer (`Wire.views`)."""
        got = self._views.get(n)
        if got is None:
            if len(self._views) >= self.MAX_KEPT_VIEWS:
                self._views.clear()
            got = self._views[n] = self.wire.views(self.buf, n)
        return got

    def used(self, n: int) -> torch.Tensor:
        """The bytes a message of `n` rows takes (what is sent)."""
        return self.buf[: self.wire.nbytes(n)]


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


class ExpertGroup:
    """This process's membership of one generation of the expert group."""

    def __init__(self, spec: GroupSpec, rank: int, device: torch.device | str = "cpu"):
        self.spec, self.rank, self.device = spec, rank, torch.device(device)
        self.num_replicas = len(spec.replicas)
        self.steps = 0  # group steps begun (every member counts the same)
        self.active: list[int] = []  # replica indices taking part in the current step
        self.pg = None  # torch.distributed backends (gloo, NCCL)
        self.mesh: SocketMesh | None = None  # the socket backend
        timeout = _timedelta(spec.timeout_s)
        t0 = time.perf_counter()
        try:
            store = dist.TCPStore(spec.host, spec.port, is_master=False, timeout=timeout, wait_for_workers=False)
            prefixed = dist.PrefixStore(f"herd-expert-group/{spec.generation}/", store)
            if spec.backend == "socket":
                self.mesh = SocketMesh(prefixed, rank, spec.world_size, spec.micro_batches, spec.timeout_s, spec.host)
            self._arrive(store)
            if self.mesh is not None:
                self.mesh.connect()
            elif spec.backend == "nccl":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self.pg = dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, options)
            else:
                self.pg = dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)
            self._store = store
            if self.pg is not None:  # gloo connects every pair here; a first all-reduce makes sure everyone did
                self._wait(self.pg.allreduce([torch.zeros(1, device=self.device)]), "forming the group")
        except (RuntimeError, dist.DistError, OSError) as e:
            self.close()
            if isinstance(e, GroupSuperseded):
                raise
            raise GroupError(f"expert group generation {spec.generation}: rank {rank} could not join "
                             f"({spec.world_size} members, store {spec.host}:{spec.port}): {e}") from e
        log.info("expert group generation %d formed (%s): rank %d of %d in %.2f s", spec.generation, spec.backend,
                 rank, spec.world_size, time.perf_counter() - t0)

    def _arrive(self, store) -> None:
        """Wait until every member arrived at this generation; give up at once when the pool has
        handed out a newer one (members that joined at about the same time would otherwise wait
        for a member that went on to the newer one until the timeout)."""
        spec = self.spec
        arrived = f"herd-expert-group/{spec.generation}/arrived"
        store.add(arrived, 1)
        deadline = time.monotonic() + spec.timeout_s
        while store.add(arrived, 0) < spec.world_size:
            if latest_generation(store) > spec.generation:
                raise GroupSuperseded(f"expert group generation {spec.generation} superseded by generation "
                                 f"{latest_generation(store)} before it formed")
            if time.monotonic() > deadline:
                raise GroupError(f"expert group generation {spec.generation}: {store.add(arrived, 0)} of "
                                 f"{spec.world_size} members arrived within {spec.timeout_s:g} s")
            time.sleep(0.002)

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(_timedelta(self.spec.timeout_s))
        except (RuntimeError, dist.DistError) as e:
            raise GroupError(f"expert group generation {self.spec.generation}, {what}: {e}") from e
        if ok is False:
            raise GroupError(f"expert group generation {self.spec.generation}, {what}: timed out after "
                             f"{self.spec.timeout_s:g} s")

    def begin(self, active: bool = False, reform: bool = False) -> tuple[list[int], bool]:
        """Start a group step: (indices of the replicas taking part, whether to leave for a new generation).

        On gloo and sockets every member sends its flags to every other member and sums what it
        receives: one hop (an all-reduce is a ring of 2 x (members - 1) hops)."""
        flags = [0] * (self.num_replicas + 1)
        if self.rank >= len(self.spec.shards) and active:
            flags[self.rank - len(self.spec.shards)] = 1
        if reform:
            flags[-1] = 1
        if self.spec.backend != "nccl":
            mine = torch.tensor(flags, dtype=torch.int64)
            peers = [r for r in range(self.spec.world_size) if r != self.rank]
            theirs = torch.zeros(self.spec.world_size, len(flags), dtype=torch.int64)
            works = [self.send(mine, r, BEGIN_TAG) for r in peers] + [self.recv(theirs[r], r, BEGIN_TAG) for r in peers]
            for w in works:
                self._wait(w, "beginning a step")
            values = (theirs.sum(0) + mine).tolist()
        else:
            summed = torch.tensor(flags, dtype=torch.int64, device=self.device)
            self._wait(self.pg.allreduce([summed]), "beginning a step")
            values = summed.tolist()
        self.steps += 1
        self.active = [i for i, v in enumerate(values[:-1]) if v]
        return self.active, values[-1] > 0

    def send(self, t: torch.Tensor, dst: int, tag: int):
        try:
            if self.mesh is not None:
                return self.mesh.send(t, dst, tag)
            return self.pg.send([t], dst, tag)
        except (RuntimeError, dist.DistError) as e:
            raise GroupError(f"expert group generation {self.spec.generation}: send to rank {dst}: {e}") from e

    def recv(self, t: torch.Tensor, src: int, tag: int):
        try:
            if self.mesh is not None:
                return self.mesh.recv(t, src, tag)
            return self.pg.recv([t], src, tag)
        except (RuntimeError, dist.DistError) as e:
            raise GroupError(f"expert group generation {self.spec.generation}: receive from rank {src}: {e}") from e

    def wait(self, work, what: str) -> None:
        self._wait(work, what)

    def close(self, error: BaseException | None = None) -> None:
        """Leave: close the connections, so that peers still waiting on us fail at once. Gloo closes
        them only when the last reference to the group's context goes, and every pending `Work`
        holds one: `error` (what made us leave) has the locals of its frames cleared first."""
        if error is not None:
            drop_frames(error)
        self.pg = None
        if self.mesh is not None:
            self.mesh.close()
            self.mesh = None


@dataclass
class ShardStats:
    """What one shard did since it started (all generations); read by the pool, the metrics and the tests."""

    steps: int = 0  # group steps with at least one active replica
    messages: int = 0  # messages received from replicas (one per replica and turn; a replica alone sends fewer)
    expert_calls: int = 0  # expert runs (one per layer and micro-batch with rows)
    union_calls: int = 0  # ... of which ran rows from two or more replicas at once
    rows: int = 0
    max_rows: int = 0
    max_replicas: int = 0  # replicas whose rows one expert run held, at most
    waits: list[float] = field(default_factory=list)  # per exchange, time waiting for the replicas' rows (unpublished)
    generation: int = -1
    groups_formed: int = 0
    union_rows: list[int] = field(default_factory=list)  # expert-run sizes not yet published as metrics

    def record(self, rows: int, replicas: int) -> None:
        self.expert_calls += 1
        self.union_calls += replicas > 1
        self.rows += rows
        self.max_rows = max(self.max_rows, rows)
        self.max_replicas = max(self.max_replicas, replicas)
        if len(self.union_rows) < 10_000:
            self.union_rows.append(rows)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("union_rows", "waits")}


def serve_shard_steps(group: ExpertGroup, experts: dict, stats: ShardStats, reform_requested) -> None:
    """A shard's side of the group steps, until everyone agrees to re-form (returns) or the group
    fails (GroupError). `experts[layer]` runs this shard's experts of `layer` (model.moe.Experts)."""
    spec = group.spec
    wire = Wire(spec)
    msgs = [Message(wire, group.device) for _ in spec.replicas]
    turns = [(layer, mb) for layer in spec.moe_layers for mb in range(spec.micro_batches)]
    gloo = spec.backend == "gloo"
    while True:
        active, reform = group.begin(reform=reform_requested())
        if reform:
            return
        if not active:
            continue
        stats.steps += 1
        if len(active) == 1:
            _serve_solo_step(group, msgs, active[0], turns, experts, stats)
            continue
        sources, posted = [(msgs[r], r) for r in active], None
        for i, (layer, mb) in enumerate(turns):  # every active replica sends one message per turn, possibly empty
            t0 = time.perf_counter()
            _receive(group, sources, layer, stats, posted)
            if len(stats.waits) < 10_000:
                stats.waits.append(time.perf_counter() - t0)
            parts = []
            for r in active:
                n, got = _check(group, msgs[r], r, expected=(layer, mb))
                if n:
                    parts.append((r, n))
            posted = _run_experts(group, msgs, parts, layer, mb, experts, stats,
                                  sources if gloo and i + 1 < len(turns) else None)


def _serve_solo_step(group: ExpertGroup, msgs: list[Message], r: int, turns: list, experts: dict,
                     stats: ShardStats) -> None:
    """A step with one active replica: it sends a message only for the turns (layer, micro-batch) it
    has rows for here, and always for the last turn, which ends the step (no union to wait for, so no
    lockstep needed; messages of one pair arrive in the order they were sent)."""
    last, position, sources, posted = turns[-1], -1, [(msgs[r], r)], None
    gloo = group.spec.backend == "gloo"
    while True:
        t0 = time.perf_counter()
        _receive(group, sources, "a solo step", stats, posted)
        if len(stats.waits) < 10_000:
            stats.waits.append(time.perf_counter() - t0)
        n, (layer, mb) = _check(group, msgs[r], r, expected=None)
        turn = turns.index((layer, mb)) if (layer, mb) in turns else -1
        if turn <= position:
            raise GroupError(f"expert group out of step: replica {r} sent layer {layer} micro-batch {mb} after turn "
                             f"{turns[position] if position >= 0 else None} of a step it runs alone")
        position = turn
        posted = _run_experts(group, msgs, [(r, n)] if n else [], layer, mb, experts, stats,
                              sources if gloo and (layer, mb) != last else None)
        if (layer, mb) == last:
            return


def _post_receives(group: ExpertGroup, sources: list[tuple[Message, int]], stats: ShardStats) -> list:
    """gloo: post a receive of one message from each replica index in `sources` into its buffer."""
    stats.messages += len(sources)
    first_replica = len(group.spec.shards)
    return [group.recv(msg.buf, first_replica + r, REQUEST_TAG) for msg, r in sources]


def _receive(group: ExpertGroup, sources: list[tuple[Message, int]], layer, stats: ShardStats,
             posted: list | None = None) -> None:
    """One message from each replica index in `sources` into its buffer (posted at once, then waited
    for); `posted`: their gloo receives, already posted (`_post_receives`)."""
    if group.spec.backend != "gloo":  # NCCL and sockets receive exact sizes: the header first, then the rows
        first_replica = len(group.spec.shards)
        stats.messages += len(sources)
        for msg, r in sources:
            group.wait(group.recv(msg.header, first_replica + r, REQUEST_TAG), "header")
        works = []
        for msg, r in sources:
            n = msg.read_header()[0]
            if 0 < n <= msg.wire.capacity:
                works.append(group.recv(msg.used(n)[HEADER * 8 :], first_replica + r, REQUEST_TAG))
    else:
        works = posted if posted is not None else _post_receives(group, sources, stats)
    for w in works:
        group.wait(w, f"receiving rows of MoE layer {layer}")


def _check(group: ExpertGroup, msg: Message, r: int, expected) -> tuple[int, tuple[int, int]]:
    """(rows, (layer, micro-batch)) of replica `r`'s message `msg`; GroupError when it is not of
    this step, not the `expected` (layer, micro-batch) (None: any), or over the capacity."""
    n, layer, step, mb = msg.read_header()
    if step != group.steps or (expected is not None and (layer, mb) != expected) or not 0 <= n <= msg.wire.capacity:
        due = f"layer {expected[0]} micro-batch {expected[1]}" if expected is not None else "a message"
        raise GroupError(f"expert group out of step: replica {r} sent layer {layer} step {step} micro-batch {mb} "
                         f"({n} rows) where {due} of step {group.steps} was due")
    return n, (layer, mb)


def run_experts(experts, x: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """A shard's experts (model.moe.Experts) on rows it was sent: up to `FEW_ROWS` (row, choice)
    pairs on the CPU one by one (`forward_rows`), else the sorted batch (`forward`)."""
    if x.device.type == "cpu" and ids.numel() <= FEW_ROWS:
        return experts.forward_rows(x, ids, scores)
    return experts(x, ids.long(), scores)


def _run_experts(group: ExpertGroup, msgs: list[Message], parts: list[tuple[int, int]], layer: int, mb: int,
                 experts: dict, stats: ShardStats, next_sources: list | None = None) -> list | None:
    """Run this shard's experts of `layer` once on the rows of `parts` ((replica index, rows)) and send
    each replica its part. The gloo receives of the next turn's messages (`next_sources`) are posted
    once the rows are read and before the replies go out: gloo's receiver tells the sender that its
    receive is posted, and that notice then reaches the replica ahead of the reply, so the replica's
    next send goes out at once instead of waiting for it. Returns those receives."""
    if not parts:
        return _post_receives(group, next_sources, stats) if next_sources else None
    views = [msgs[r].views(n) for r, n in parts]
    if len(views) == 1:
        x, ids, scores = views[0]
    else:
        x, ids, scores = (torch.cat(v) for v in zip(*views, strict=True))
    out = run_experts(experts[layer], x, ids, scores)  # a new tensor: the buffers can take the next messages
    posted = _post_receives(group, next_sources, stats) if next_sources else None
    first_replica = len(group.spec.shards)
    sends, start = [], 0
    for r, n in parts:
        sends.append(group.send(out[start : start + n], first_replica + r, mb))
        start += n
    for w in sends:
        group.wait(w, f"returning rows of MoE layer {layer}")
    stats.record(start, len(parts))
    return posted


def serve_shard_generation(spec: GroupSpec, rank: int, experts: dict, stats: ShardStats, reform_requested,
                           device: torch.device | str = "cpu") -> str | None:
    """Form generation `spec` as shard `rank` and serve its steps until a re-form (returns None) or a
    failure (returns what failed; the group is closed either way)."""
    group = None
    try:
        group = ExpertGroup(spec, rank, device)
        stats.generation = spec.generation
        stats.groups_formed += 1
        with torch.inference_mode():
            serve_shard_steps(group, experts, stats, reform_requested)
        return None
    except GroupError as e:
        if group is not None:
            group.close(e)
            group = None
        return str(e)
    finally:
        if group is not None:
            group.close()
