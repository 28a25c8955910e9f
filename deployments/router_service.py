"""`RouterService`, the router service: one engine per replica (scheduler, paged KV cache, attention, MoE gate,
sampling). Experts run in-process (colocated) or on the shared expert-shard actors."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import ray
from ray import serve

from deployments.collective_experts import CollectiveExperts
from deployments.config import ExpertsConfig, HerdConfig
from deployments.engine.async_engine import AsyncEngine
from deployments.engine.engine import Engine
from deployments.engine.output import RequestOutput
from deployments.engine.params import SamplingParams
from deployments.engine.sequence import ImageInput
from deployments.expert_shard import ShardedExperts, get_or_create_pool, join_expert_group, wait_for_shards
from deployments.logs import route_to_serve_logs
from deployments.metrics import RouterServiceMetrics
from deployments.shared_cache.setup import connect_shared_cache
from model.checkpoint import load
from model.device import default_dtype, resolve_device
from model.quantization import checkpoint_quantization, served_expert_quantization
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
# After a failed dispatch, how long a step waits for the expert shards (a new pool, a restarted shard)
# before failing fast again: short, so the engine loop keeps answering and retries on the next step.
RECONNECT_TIMEOUT_S = 10.0


def experts_are_sharded(experts: ExpertsConfig, cluster_gpus: float) -> bool:
    """Sharded when configured, except on a cluster with one GPU (or none) whose shards would want
    GPUs: there the experts run inside the router service (colocated), which is what one GPU can hold best."""
    if experts.mode != "sharded":
        return False
    if experts.num_gpus_per_shard > 0 and cluster_gpus <= 1:
        log.warning("experts.mode is sharded but the cluster has %g GPU: running the experts colocated", cluster_gpus)
        return False
    return True


@serve.deployment
class RouterService:
    def __init__(self, config: dict):
        route_to_serve_logs()
        cfg = HerdConfig.model_validate(config)
        device = resolve_device(cfg.device)
        dtype = default_dtype(device)
        sharded = experts_are_sharded(cfg.experts, ray.cluster_resources().get("GPU", 0))
        # what the experts run in (an FP8 checkpoint: fp8 whatever is asked); it keys the shared KV cache too
        quantization = served_expert_quantization(cfg.experts.quantization, checkpoint_quantization(cfg.model))
        model = load(cfg.model, device=device, dtype=dtype, experts=range(0, 0) if sharded else None,
                     quantization=quantization)
        self.metrics = RouterServiceMetrics()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        backend: ShardedExperts | CollectiveExperts | None = None
        if sharded:
            def pool():  # the shards run in our dtype and engine.expert_kernel
                return get_or_create_pool(cfg.model, cfg.experts, cfg.device, dtype, cfg.engine.expert_kernel)

            def connect(timeout_s: float) -> list[tuple]:
                return wait_for_shards(pool(), timeout_s)

            shards = connect(cfg.experts.startup_timeout_s)
            if cfg.experts.transport == "collective":
                capacity, replica_id = cfg.engine.max_num_batched_tokens, self.replica_id
                backend = CollectiveExperts(
                    lambda after: join_expert_group(pool, replica_id, capacity, after, cfg.experts.group_timeout_s),
                    self.replica_id, device, cfg.experts.idle_poll_s)
            else:
                backend = ShardedExperts(shards, on_dispatch=self.metrics.record_dispatch,
                                         reconnect=lambda: connect(RECONNECT_TIMEOUT_S))
        self.experts = backend
        engine = Engine(model, Tokenizer.from_dir(cfg.model), cfg.engine, experts=backend)
        self.shared_cache = (connect_shared_cache(cfg.redis, engine, cfg.model, quantization)
                             if cfg.redis else None)
        self.engine = AsyncEngine(engine)
        self._stats_task: asyncio.Task | None = None
        if engine.lockstep:  # the expert group steps from now on, work or not (Serve runs __init__ on the event loop)
            self.engine.start()
            self._stats_task = asyncio.create_task(self._publish_stats())
        log.info("router ready (%s experts, %s)", "sharded" if sharded else "colocated", device)

    async def generate(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                       images: Sequence[ImageInput] = (), cache_salt: str = "",
                       session_id: str = "") -> AsyncIterator[RequestOutput]:
        """Stream one request. `cache_salt` (the tenant) keys its prefix-cache entries; `session_id`
        is read by the prefix-affinity request router in the caller (deployments/routing/prefix_affinity.py)."""
        if self._stats_task is None:
            self._stats_task = asyncio.create_task(self._publish_stats())
        self.engine.check_admission()  # overloaded: refused before the shared-cache lookup
        start = last = time.perf_counter()
        status = "error"
        try:
            chunks, known = (await self.shared_cache.lookup(self.engine.engine, prompt_ids, images, cache_salt)
                             if self.shared_cache else ([], 0))
            async for out in self.engine.generate(request_id, prompt_ids, params, images=images, cache_salt=cache_salt,
                                                  shared_chunks=chunks, num_shared_chunks=known):
                now = time.perf_counter()
                (self.metrics.ttft if out.num_generated_tokens == 1 else self.metrics.itl).observe(now - last)
                last = now
                if out.finished:
                    status = "ok"
                    self.metrics.record_finished(out)
                    out = replace(out, replica=self.replica_id)
                yield out
        finally:
            self.metrics.requests.inc(tags={"status": status})
            log.debug("request %s %s after %.3f s", request_id, status, time.perf_counter() - start)

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy and Serve replaces
        it: when requests are unfinished and the engine loop died or made no progress for
        `engine.stuck_after_s`."""
        self.engine.check_health()

    async def _publish_stats(self) -> None:
        while True:
            self.metrics.record_stats(self.engine.stats())
            self.metrics.record_expert_tokens(self.engine.expert_tokens())
            if isinstance(self.experts, CollectiveExperts):
                self.metrics.record_group(self.experts.stats)
            if self.shared_cache is not None:
                await self.shared_cache.store.probe()
                self.metrics.redis.publish(self.shared_cache, self.shared_cache.store)
            await asyncio.sleep(1.0)

    def stats(self) -> dict:
        stats = self.engine.stats()
        if self.shared_cache is not None:
            t, s = self.shared_cache.stats, self.shared_cache.store.stats
            stats["prefix_cache"] = {"redis_up": not self.shared_cache.store.breaker.is_open,
                                     "hit_chunks": t.hit_chunks,
                                     "miss_chunks": t.miss_chunks, "skipped": t.skipped,
                                     "integrity_failures": dict(t.integrity_failures), "bytes_read": s.bytes_read,
                                     "bytes_written": s.bytes_written, "errors": dict(s.errors)}
        return stats
