"""Expert-shard actors: each holds a contiguous slice of the routed experts of every MoE layer
(read from the checkpoint by slice, nothing else loaded) and runs them for any router-service replica.

`ExpertPool` is one named, detached actor that creates the shards once, in a placement group
(PACK or SPREAD over nodes), and hands their handles to every router-service replica. Shards restart
when they die; a call in flight to a dead shard fails fast (no retries) and the router service turns
that into UNAVAILABLE for the requests of that step. A pool that dies (its shards die with it) is
created anew by the next dispatch after a failure (`ShardedExperts.reconnect`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.config import ExpertsConfig
from deployments.engine.experts import ExpertBackendUnavailable
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


class ExpertsUnavailable(ExpertBackendUnavailable):
    """An expert shard could not be reached (died, restarting, or timed out)."""


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
        log.info("expert shard %s ready on %s in %s (%d MoE layers)", self.range, self.device, dtype, len(self.experts))

    def info(self) -> dict:
        """Where this shard runs, and its experts' precision and bytes (weights and scales)."""
        kinds = {type(m.gate_up_proj).__name__ for m in self.experts.values()}
        return {"experts": self.range, "node_id": ray.get_runtime_context().get_node_id(),
                "weights": sorted(kinds), "expert_bytes": sum(module_bytes(m) for m in self.experts.values())}

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
        experts = ExpertsConfig.model_validate(cfg)
        num_experts = Llama4Config.from_dir(model_path).text.num_local_experts
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
            ).remote(model_path, r.start, r.stop, device, dtype, kernel, experts.quantization)
            for i, r in enumerate(ranges)
        ]
        self.ranges = [(r.start, r.stop) for r in ranges]

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


class ShardedExperts:
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
            self.shards = self.reconnect()  # raises ExpertsUnavailable while the shards are not back
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
