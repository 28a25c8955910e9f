"""The expert group: M router-service (engine) replicas and N expert shards as one `torch.distributed`
process group (gloo on the CPU, NCCL on GPUs), stepping in lockstep. No tensor goes through Ray.

Ranks: shards 0..N-1, replicas N..N+M-1. The `ExpertPool` actor (deployments/expert_shard.py) hosts
the rendezvous `TCPStore`, hands out the `GroupSpec` (ranks, address, generation) and makes a new
generation when a member dies, restarts, joins or leaves. A member forms its own
`ProcessGroupGloo`/`ProcessGroupNCCL` object on a `PrefixStore` of that generation, so one process
can leave a group and form the next one (the default group of `init_process_group` could not).

One group step (one forward pass of the replicas that have work):
1. `begin`: an all-reduce of `[active flag of each replica..., re-form requested]`. Every member
   learns which replicas take part; a shard told of a newer generation by the pool raises the
   re-form flag and everyone leaves the group at this step boundary (no request fails).
2. For each MoE layer, for each micro-batch: every active replica sends each shard one message,
   `header | hidden rows | expert ids | gate scores` (int64 x4 | model dtype | int32 | fp32, each
   array in its own dtype, laid out one after the other in a fixed-capacity byte buffer; only the
   used prefix is sent; possibly no rows). Each shard runs its experts once on the union of the
   rows of all active replicas and sends each replica its part back.
One message each way per (replica, shard, layer, micro-batch): on gloo a message costs a syscall and
a wake-up of its receiver; four messages (header and three arrays) cost ~3x more here.

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

log = logging.getLogger(__name__)

HEADER = 4  # int64: rows, layer, step number, micro-batch
IDS_DTYPE = torch.int32
SCORES_DTYPE = torch.float32
_ALIGN = 16


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
    backend: str = "gloo"

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


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


class ExpertGroup:
    """This process's membership of one generation of the expert group."""

    def __init__(self, spec: GroupSpec, rank: int, device: torch.device | str = "cpu"):
        self.spec, self.rank, self.device = spec, rank, torch.device(device)
        self.num_replicas = len(spec.replicas)
        self.steps = 0  # group steps begun (every member counts the same)
        timeout = _timedelta(spec.timeout_s)
        t0 = time.perf_counter()
        try:
            store = dist.TCPStore(spec.host, spec.port, is_master=False, timeout=timeout, wait_for_workers=False)
            self._arrive(store)
            prefixed = dist.PrefixStore(f"herd-expert-group/{spec.generation}/", store)
            if spec.backend == "nccl":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self.pg = dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, options)
            else:
                self.pg = dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)
            self._store = store
            # gloo connects every pair here; a first all-reduce makes sure everyone did
            self._wait(self.pg.allreduce([torch.zeros(1, device=self.device)]), "forming the group")
        except (RuntimeError, dist.DistError) as e:
            self.pg = None  # type: ignore[assignment]
            raise GroupError(f"expert group generation {spec.generation}: rank {rank} could not join "
                             f"({spec.world_size} members, store {spec.host}:{spec.port}): {e}") from e
        log.info("expert group generation %d formed: rank %d of %d in %.2f s", spec.generation, rank,
                 spec.world_size, time.perf_counter() - t0)

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
        """Start a group step: (indices of the replicas taking part, whether to leave for a new generation)."""
        flags = torch.zeros(self.num_replicas + 1, dtype=torch.int64, device=self.device)
        if self.rank >= len(self.spec.shards) and active:
            flags[self.rank - len(self.spec.shards)] = 1
        if reform:
            flags[-1] = 1
        self._wait(self.pg.allreduce([flags]), "beginning a step")
        self.steps += 1
        values = flags.tolist()
        return [i for i, v in enumerate(values[:-1]) if v], values[-1] > 0

    def send(self, t: torch.Tensor, dst: int, tag: int):
        try:
            return self.pg.send([t], dst, tag)
        except (RuntimeError, dist.DistError) as e:
            raise GroupError(f"expert group generation {self.spec.generation}: send to rank {dst}: {e}") from e

    def recv(self, t: torch.Tensor, src: int, tag: int):
        try:
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


@dataclass
class ShardStats:
    """What one shard did since it started (all generations); read by the pool, the metrics and the tests."""

    steps: int = 0  # group steps with at least one active replica
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
    first_replica = len(spec.shards)
    nccl = spec.backend == "nccl"
    bufs = [[wire.buffer(group.device) for _ in spec.replicas] for _ in range(spec.micro_batches)]
    while True:
        active, reform = group.begin(reform=reform_requested())
        if reform:
            return
        if not active:
            continue
        stats.steps += 1
        step = group.steps
        for layer in spec.moe_layers:
            for mb in range(spec.micro_batches):
                t0 = time.perf_counter()
                bufs_mb = bufs[mb]
                if nccl:  # NCCL receives need the exact size: the header first, then the rows
                    for r in active:
                        group.wait(group.recv(bufs_mb[r][: HEADER * 8], first_replica + r, mb), "header")
                    works = []
                    for r in active:
                        n = int(wire.header(bufs_mb[r])[0])
                        if n:
                            works.append(group.recv(bufs_mb[r][HEADER * 8 : wire.nbytes(n)], first_replica + r, mb))
                else:
                    works = [group.recv(bufs_mb[r], first_replica + r, mb) for r in active]
                for w in works:
                    group.wait(w, f"receiving rows of MoE layer {layer}")
                if len(stats.waits) < 10_000:
                    stats.waits.append(time.perf_counter() - t0)
                parts = []
                for r in active:
                    n, got_layer, got_step, got_mb = wire.header(bufs_mb[r]).tolist()
                    if (got_layer, got_step, got_mb) != (layer, step, mb) or not 0 <= n <= wire.capacity:
                        raise GroupError(f"expert group out of step: replica {r} sent layer {got_layer} step "
                                         f"{got_step} micro-batch {got_mb} ({n} rows) where layer {layer} step {step} "
                                         f"micro-batch {mb} was due")
                    if n:
                        parts.append((r, n))
                if not parts:
                    continue
                views = [wire.views(bufs_mb[r], n) for r, n in parts]
                if len(views) == 1:
                    x, ids, scores = views[0]
                else:
                    x, ids, scores = (torch.cat(v) for v in zip(*views, strict=True))
                out = experts[layer](x, ids.long(), scores)
                sends, start = [], 0
                for r, n in parts:
                    sends.append(group.send(out[start : start + n], first_replica + r, mb))
                    start += n
                for w in sends:
                    group.wait(w, f"returning rows of MoE layer {layer}")
                stats.record(start, len(parts))


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
