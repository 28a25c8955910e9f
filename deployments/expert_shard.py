"""Expert-shard actors: each holds a contiguous slice of the routed experts of every MoE layer
(read from the checkpoint by slice, nothing else loaded) and runs them for every router-service replica.

`ExpertPool` is one named, detached actor that creates the shards once, in a placement group
(PACK or SPREAD over nodes), restarts them through Ray when they die, and runs the expert group
(`experts.transport: collective`, deployments/expert_group.py): it hosts the group's rendezvous
store, keeps the members (shards, then the replicas that `join`), and hands out a new generation
when a member joins, dies or restarts. With `experts.transport: ray` the replicas instead call
`ExpertShard.run` once per shard and MoE layer (`ShardedExperts`). A pool that dies (its shards die
with it) is created anew by the next replica that needs it (`get_or_create_pool`).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.config import ExpertsConfig
from deployments.engine.experts import UnframedBackend
from deployments.expert_group import (
    ExpertsNotReady,
    ExpertsUnavailable,
    GroupSpec,
    ShardStats,
    publish_generation,
    serve_shard_generation,
)
from deployments.process_env import env_for_sharded
from model.checkpoint import load_expert_shard
from model.config import Llama4Config
from model.device import resolve_device
from model.expert_kernel import resolve_expert_kernel
from model.quantization import checkpoint_quantization, module_bytes, served_expert_quantization

log = logging.getLogger(__name__)
NAMESPACE = "herd"
POOL_NAME = "herd-expert-pool"


# Ray deserializes numpy arrays without a copy and pickles torch tensors: a dispatch sends arrays
# (bf16 travels as int16 bits; numpy has no bf16). Measured per call with 2 shards on CPU, batch 128:
# 1.4 ms with arrays vs 2.9 ms with tensors (bench/RESULTS.md).
# Each array of a dispatch has one fixed dtype, whatever the model's: hidden states (sent and
# returned) in the shards' dtype, expert ids int64, gate scores fp32 (what `MoEGate.route` returns).
IDS_DTYPE = torch.int64
SCORES_DTYPE = torch.float32


def to_wire(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu", copy=False).contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """The tensor of `dtype` that `to_wire` sent; a TypeError if the array is not of that dtype
    (reinterpreting one dtype's bits as another's would be silent garbage)."""
    expected = np.dtype(np.int16) if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    if a.dtype != expected:
        raise TypeError(f"wire array of {a.dtype} where {dtype} (as {expected}) was expected")
    t = torch.from_numpy(np.array(a, copy=not a.flags.writeable))  # Ray's arrays are read-only views
    return (t.view(torch.bfloat16) if dtype == torch.bfloat16 else t).to(device)


def split_experts(num_experts: int, num_shards: int) -> list[range]:
    """Contiguous, balanced expert ranges, one per shard."""
    if num_shards > num_experts:
        raise ValueError(f"{num_shards} shards for {num_experts} experts: at most one shard per expert")
    bounds = [round(i * num_experts / num_shards) for i in range(num_shards + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


@ray.remote(max_restarts=-1, max_task_retries=0)
class ExpertShard:
    def __init__(self, model_path: str, start: int, stop: int, device: str, dtype: torch.dtype,
                 kernel: str = "auto", quantization: str = "none"):
        """`dtype`: the engine's (router service's) model dtype, which the hidden states travel in;
        `kernel`: the experts' kernel (`engine.expert_kernel`; `auto` resolved on this shard's device);
        `quantization`: none | fp8 | int4, applied to this shard's slice only as it is read."""
        self.device = resolve_device(device)
        self.dtype = dtype
        served = served_expert_quantization(quantization, checkpoint_quantization(model_path))
        kernel = resolve_expert_kernel(kernel, self.device, quantized=served != "none")
        self.experts = load_expert_shard(model_path, range(start, stop), device=self.device, dtype=dtype,
                                         expert_kernel=kernel, quantization=quantization)
        self.range = (start, stop)
        self.group_stats = ShardStats()
        self._pending: tuple[GroupSpec, int] | None = None  # the next generation to join
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        log.info("expert shard %s ready on %s in %s (%d MoE layers)", self.range, self.device, dtype, len(self.experts))

    def info(self) -> dict:
        """Where this shard runs, and its experts' precision and bytes (weights and scales)."""
        kinds = {type(m.gate_up_proj).__name__ for m in self.experts.values()}
        return {"experts": self.range, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "weights": sorted(kinds), "expert_bytes": sum(module_bytes(m) for m in self.experts.values())}

    def join_group(self, spec: GroupSpec, rank: int) -> None:
        """Leave the current generation of the expert group at its next step boundary and form `spec`."""
        with self._cond:
            self._pending = (spec, rank)
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve_group, name="herd-expert-group", daemon=True)
            self._thread.start()
            threading.Thread(target=self._publish_metrics, name="herd-expert-metrics", daemon=True).start()

    def stats(self) -> dict:
        return {"experts": self.range, **self.group_stats.as_dict()}

    def _serve_group(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                (spec, rank), self._pending = self._pending, None
            try:
                error = serve_shard_generation(spec, rank, self.experts, self.group_stats,
                                               lambda: self._pending is not None, self.device)
            except Exception:  # a bug, not the group: log it, wait for the next generation
                log.exception("expert shard %s: the group loop failed", self.range)
                continue
            if error is not None:  # the pool hands out the next generation when a replica asks for it
                log.warning("expert shard %s left generation %d: %s", self.range, spec.generation, error)

    def _publish_metrics(self) -> None:
        from deployments.metrics import ExpertShardMetrics

        metrics = ExpertShardMetrics(f"{self.range[0]}-{self.range[1] - 1}")
        while True:
            time.sleep(1.0)
            metrics.publish(self.group_stats)

    @torch.inference_mode()
    def run(self, layer: int, x: np.ndarray, expert_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The routed experts of `layer` on the tokens sent (arrays and their dtypes: see `to_wire`)."""
        dev = self.device
        out = self.experts[layer](from_wire(x, self.dtype, dev), from_wire(expert_ids, IDS_DTYPE, dev),
                                  from_wire(scores, SCORES_DTYPE, dev))
        return to_wire(out)


@ray.remote(num_cpus=0)
class ExpertPool:
    """Creates the shards once and tells router-service replicas where they are."""

    def __init__(self, model_path: str, cfg: dict, device: str, dtype: torch.dtype, kernel: str = "auto"):
        experts = self.experts = ExpertsConfig.model_validate(cfg)
        text = Llama4Config.from_dir(model_path).text
        num_experts = text.num_local_experts
        assert text.moe_layers is not None  # filled in by TextConfig
        self.moe_layers = tuple(text.moe_layers)
        self.hidden_size, self.top_k = text.hidden_size, text.num_experts_per_tok
        self.dtype = dtype
        ranges = split_experts(num_experts, experts.num_shards)
        bundle = {"CPU": experts.num_cpus_per_shard, **experts.resources_per_shard}
        if experts.num_gpus_per_shard:
            bundle["GPU"] = experts.num_gpus_per_shard
        self.pg = placement_group([dict(bundle) for _ in ranges], strategy=experts.placement_strategy)
        ray.get(self.pg.ready())
        self.shards = [
            ExpertShard.options(
                num_cpus=experts.num_cpus_per_shard, num_gpus=experts.num_gpus_per_shard,
                resources=experts.resources_per_shard,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": env_for_sharded()},  # empty when the node sets it
            ).remote(model_path, r.start, r.stop, device, dtype, kernel, experts.quantization)
            for i, r in enumerate(ranges)
        ]
        self.ranges = [(r.start, r.stop) for r in ranges]
        # The expert group: its rendezvous store lives as long as this pool.
        self.host = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=experts.group_timeout_s))
        self.members: dict[str, tuple] = {}  # replica id -> (actor handle or None, rows capacity)
        self.spec: GroupSpec | None = None
        self.generation = 0

    def join(self, replica_id: str, handle, capacity: int, after_generation: int) -> GroupSpec:
        """The generation of the expert group `replica_id` must form: newer than `after_generation`, with
        this replica in it (a new one when needed: after a failure, or for a replica not in the current one)."""
        self.members[replica_id] = (handle, capacity)
        spec = self.spec
        # after_generation < 0: a replica (re)starting its backend; it must not be handed a generation
        # formed before it came (its old self may be in it)
        if after_generation >= 0 and spec is not None and spec.generation > after_generation \
                and replica_id in spec.replicas:
            return spec
        return self._reform(after_generation)

    def group(self) -> dict:
        spec = self.spec
        return {"generation": spec.generation if spec else None, "replicas": list(spec.replicas) if spec else [],
                "shards": list(spec.shards) if spec else []}

    def shard_stats(self) -> list[dict]:
        return ray.get([s.stats.remote() for s in self.shards], timeout=self.experts.group_timeout_s)

    def _reform(self, after_generation: int) -> GroupSpec:
        """A new generation: the members still alive, the shards (restarted ones) loaded."""
        pings = {rid: h.__ray_ready__.remote() for rid, (h, _) in self.members.items() if h is not None}
        for rid, ref in pings.items():
            try:
                ray.get(ref, timeout=5)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                log.info("expert group: replica %s is gone", rid)
                del self.members[rid]
            except ray.exceptions.GetTimeoutError:
                pass  # busy, not dead: it stays
        try:
            wait_until_alive(self.shards, self.experts.startup_timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.GetTimeoutError) as e:
            raise ExpertsUnavailable(f"expert shards not ready for a new expert group: {e}") from e
        self.generation = max(self.generation, after_generation) + 1
        e = self.experts
        spec = GroupSpec(
            generation=self.generation, host=self.host, port=self.store.port, shards=tuple(self.ranges),
            replicas=tuple(self.members), moe_layers=self.moe_layers, hidden_size=self.hidden_size, top_k=self.top_k,
            capacity=max(c for _, c in self.members.values()), dtype=self.dtype, micro_batches=e.micro_batches,
            timeout_s=e.group_timeout_s, backend="nccl" if e.num_gpus_per_shard > 0 else e.cpu_group_backend)
        publish_generation(self.store, spec.generation)  # members still forming an older one give up
        ray.get([s.join_group.remote(spec, rank) for rank, s in enumerate(self.shards)], timeout=e.group_timeout_s)
        self.spec = spec
        log.info("expert group generation %d: %d shards, replicas %s", spec.generation, len(spec.shards), spec.replicas)
        return spec

    def shards_and_ranges(self) -> list[tuple]:
        return list(zip(self.shards, self.ranges, strict=True))

    def get_placement_group(self):
        return self.pg


def get_or_create_pool(model_path: str, cfg: ExpertsConfig, device: str,
                       dtype: torch.dtype, kernel: str = "auto") -> ray.actor.ActorHandle:
    """`dtype`: the engine's model dtype; the shards hold their experts in it. `kernel`: their
    kernel (`engine.expert_kernel`)."""
    return ExpertPool.options(name=POOL_NAME, namespace=NAMESPACE, lifetime="detached",
                              get_if_exists=True).remote(model_path, cfg.model_dump(), device, dtype, kernel)


def wait_until_alive(shards: list, timeout_s: float) -> None:
    """Until every shard answers (a restarting one is waited for); the last error after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    for shard in shards:
        while True:
            try:
                ray.get(shard.info.remote(), timeout=max(deadline - time.monotonic(), 0.1))
                break
            except ray.exceptions.ActorUnavailableError:  # restarting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def join_expert_group(pool_of: Callable[[], ray.actor.ActorHandle], replica_id: str, capacity: int,
                      after_generation: int, timeout_s: float) -> GroupSpec:
    """The pool's `join` for this (Serve replica or driver) process; ExpertsUnavailable when the pool
    cannot answer within `timeout_s` (a new pool is made when the named one is gone)."""
    handle = ray.get_runtime_context().current_actor if ray.get_runtime_context().get_actor_id() else None
    try:
        return ray.get(pool_of().join.remote(replica_id, handle, capacity, after_generation), timeout=timeout_s)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as e:
        raise ExpertsUnavailable(f"expert pool unavailable: {e}") from e
    except ray.exceptions.RayTaskError as e:
        raise ExpertsUnavailable(f"expert group not formed: {e}") from e


def kill_pool(timeout_s: float = 5.0) -> bool:
    """Kill the named `ExpertPool` of the connected Ray cluster and what it made: when the pool
    answers within `timeout_s`, its shards (no restart) and its placement group; then the pool actor
    itself. False if there is no pool (nothing to do). A pool that does not answer (dead, or still
    waiting for its placement group) is killed all the same; Ray removes what it owns after it."""
    try:
        pool = ray.get_actor(POOL_NAME, namespace=NAMESPACE)
    except ValueError:
        return False
    shards, pg = [], None
    try:
        shards = ray.get(pool.shards_and_ranges.remote(), timeout=timeout_s)
        pg = ray.get(pool.get_placement_group.remote(), timeout=timeout_s)
    except (ray.exceptions.RayError, AttributeError):  # AttributeError: a pool made by an older Herd
        pass
    for handle, _ in shards:
        ray.kill(handle, no_restart=True)
    if pg is not None:
        remove_placement_group(pg)
    ray.kill(pool)
    return True


def wait_for_shards(pool, timeout_s: float) -> list[tuple]:
    """The shards once every one has loaded its experts; a clear error if they cannot be placed."""
    try:
        shards = ray.get(pool.shards_and_ranges.remote(), timeout=timeout_s)
        ray.get([handle.info.remote() for handle, _ in shards], timeout=timeout_s)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
        raise ExpertsUnavailable(f"expert shards unavailable: {e}") from e
    except ray.exceptions.GetTimeoutError as e:
        raise ExpertsUnavailable(
            f"expert shards not ready after {timeout_s:.0f} s: check that the cluster has the resources of "
            "experts.num_shards bundles (num_cpus/num_gpus/resources_per_shard) free for the placement group"
        ) from e
    return shards


class ShardedExperts(UnframedBackend):
    """`ExpertBackend` that sends each shard only the tokens routed to its experts and adds the
    results back (runs on the engine thread).

    `reconnect` (optional) returns the current shards: after a failed dispatch the next one calls it
    first, so a pool that died (taking its shards with it) is replaced by a new one
    (`get_or_create_pool` makes one when the named pool is gone) and a restarted shard is waited for
    briefly; while that fails, dispatches fail fast with ExpertsUnavailable."""

    def __init__(self, shards: list[tuple], timeout_s: float = 30.0, on_dispatch=None,
                 reconnect: Callable[[], list[tuple]] | None = None):
        self.shards = shards  # [(handle, (start, stop))]
        self.timeout_s = timeout_s
        self.on_dispatch = on_dispatch  # callback(layer, shard_index, num_tokens, seconds)
        self.reconnect = reconnect
        self.stale = False  # a dispatch failed: reconnect before the next one

    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.stale and self.reconnect is not None:
            try:
                self.shards = self.reconnect()
            except ExpertsUnavailable as e:  # the shards are not back: nothing of this step ran yet
                raise ExpertsNotReady(str(e)) from e
            self.stale = False
        start_time = time.perf_counter()
        calls = []
        expert_ids, scores = expert_ids.to(IDS_DTYPE), scores.to(SCORES_DTYPE)
        for i, (handle, (start, stop)) in enumerate(self.shards):
            rows = ((expert_ids >= start) & (expert_ids < stop)).any(dim=1).nonzero().squeeze(1)
            if rows.numel():
                calls.append((i, rows, handle.run.remote(layer, to_wire(x[rows]), to_wire(expert_ids[rows]),
                                                         to_wire(scores[rows]))))
        out = torch.zeros_like(x)
        try:
            for _, rows, ref in calls:
                out.index_add_(0, rows, from_wire(ray.get(ref, timeout=self.timeout_s), x.dtype, x.device))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                ray.exceptions.ActorUnavailableError) as e:
            self.stale = True
            raise ExpertsUnavailable(f"expert shard unavailable at MoE layer {layer}: {e}") from e
        if self.on_dispatch is not None:
            seconds = time.perf_counter() - start_time
            for i, rows, _ in calls:
                self.on_dispatch(layer, i, int(rows.numel()), seconds)
        return out
