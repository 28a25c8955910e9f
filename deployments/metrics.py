"""Serving metrics through `ray.util.metrics` (the Ray dashboard and its Prometheus endpoint show
them with a `ray_` prefix). Names match the Grafana dashboard in k8s/herd/dashboards/."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class RouterMetrics:
    def __init__(self) -> None:
        self.requests = Counter("herd_requests", "finished requests by status", tag_keys=("status",))
        self.ttft = Histogram("herd_ttft_seconds", "time to first token", boundaries=LATENCY_BUCKETS)
        self.itl = Histogram("herd_itl_seconds", "inter-token latency", boundaries=LATENCY_BUCKETS)
        self.generated = Counter("herd_generated_tokens", "generated tokens")
        self.prompt = Counter("herd_prompt_tokens", "prompt tokens")
        self.cached = Counter("herd_prefix_cache_hit_tokens", "prompt tokens served from a prefix cache",
                              tag_keys=("tier",))
        self.running = Gauge("herd_running_sequences", "sequences running")
        self.waiting = Gauge("herd_waiting_sequences", "sequences waiting")
        self.kv_used = Gauge("herd_kv_blocks_used", "KV blocks in use", tag_keys=("group",))
        self.kv_free = Gauge("herd_kv_blocks_free", "KV blocks free", tag_keys=("group",))
        self.expert_tokens = Counter("herd_expert_tokens", "tokens dispatched per expert shard", tag_keys=("shard",))
        self.dispatch = Histogram("herd_expert_dispatch_seconds", "MoE dispatch latency per layer",
                                  boundaries=LATENCY_BUCKETS, tag_keys=("layer",))

    def record_finished(self, prompt_tokens: int, generated_tokens: int, cached_tokens: int) -> None:
        for counter, value, tags in ((self.prompt, prompt_tokens, None), (self.generated, generated_tokens, None),
                                     (self.cached, cached_tokens, {"tier": "local"})):
            if value > 0:  # ray's Counter refuses 0
                counter.inc(value, tags=tags)

    def record_stats(self, stats: dict[str, int]) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        for key, value in stats.items():
            if key.startswith("kv_"):
                _, group, kind = key.split("_")
                (self.kv_used if kind == "used" else self.kv_free).set(value, tags={"group": group})

    def record_dispatch(self, layer: int, shard: int, num_tokens: int, seconds: float) -> None:
        self.expert_tokens.inc(num_tokens, tags={"shard": str(shard)})
        self.dispatch.observe(seconds, tags={"layer": str(layer)})


class VisionMetrics:
    def __init__(self) -> None:
        self.batch_size = Histogram("herd_vision_batch_size", "images per vision batch",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.cache_hits = Counter("herd_vision_cache_hits", "image embeddings served from the cache")
