"""The Router deployment: one engine per replica (scheduler, paged KV cache, attention, MoE gate,
sampling). Experts run in-process (colocated) or on the shared expert-shard actors."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Sequence

import ray
import torch
from ray import serve

from cluster.config import HerdConfig
from deployments.engine.async_engine import AsyncEngine
from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from deployments.engine.sequence import ImageInput
from deployments.expert_shard import ShardedExperts, get_or_create_pool, wait_for_shards
from deployments.metrics import RouterMetrics
from deployments.request import GenerationDelta
from model.checkpoint import load
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def resolve_device(device: str) -> tuple[str, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, (torch.bfloat16 if device == "cuda" else torch.float32)


@serve.deployment
class Router:
    def __init__(self, config: dict):
        cfg = HerdConfig.model_validate(config)
        device, dtype = resolve_device(cfg.device)
        sharded = cfg.experts.mode == "sharded"
        model = load(cfg.model, device=device, dtype=dtype, experts=range(0, 0) if sharded else None)
        self.metrics = RouterMetrics()
        backend = None
        if sharded:
            shards = wait_for_shards(get_or_create_pool(cfg.model, cfg.experts, cfg.device), cfg.experts.startup_timeout_s)
            backend = ShardedExperts(shards, on_dispatch=self.metrics.record_dispatch)
        self.engine = AsyncEngine(Engine(model, Tokenizer.from_dir(cfg.model), cfg.engine, experts=backend))
        self._stats_task: asyncio.Task | None = None
        log.info("router ready (%s experts, %s)", cfg.experts.mode, device)

    async def generate(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                       images: Sequence[ImageInput] = (), cache_salt: str = "") -> AsyncIterator[GenerationDelta]:
        if self._stats_task is None:
            self._stats_task = asyncio.create_task(self._publish_stats())
        start = last = time.perf_counter()
        status = "error"
        try:
            async for out in self.engine.generate(request_id, prompt_ids, params, images=images, cache_salt=cache_salt):
                now = time.perf_counter()
                (self.metrics.ttft if out.num_generated_tokens == 1 else self.metrics.itl).observe(now - last)
                last = now
                if out.finished:
                    status = "ok"
                    self.metrics.record_finished(out.num_prompt_tokens, out.num_generated_tokens,
                                                 out.num_cached_tokens)
                yield GenerationDelta(out.request_id, out.token_ids, out.text, out.logprobs, out.finish_reason,
                                      out.num_prompt_tokens, out.num_generated_tokens, out.num_cached_tokens)
        finally:
            self.metrics.requests.inc(tags={"status": status})
            log.debug("request %s %s after %.3f s", request_id, status, time.perf_counter() - start)

    async def _publish_stats(self) -> None:
        while True:
            self.metrics.record_stats(self.engine.stats())
            await asyncio.sleep(1.0)

    def stats(self) -> dict[str, int]:
        return self.engine.stats()
