"""Serving metrics through `ray.util.metrics` (the Ray dashboard and its Prometheus endpoint show
them with a `ray_` prefix, counters with a `_total` suffix). The Grafana dashboard in
k8s/herd/dashboards/ reads the latency, token, KV, prefix-hit and expert metrics."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from deployments.engine.output import RequestOutput


def inc_by_growth(counter: Counter, seen: dict, key, total: int, tags: dict | None = None) -> None:
    """Feed `counter` from a cumulative `total` kept elsewhere: add what it grew since `seen[key]`."""
    delta = total - seen.get(key, 0)
    if delta > 0:
        counter.inc(delta, tags=tags)
        seen[key] = total


LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class RouterServiceMetrics:
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

        self.expert_routed = Counter("herd_expert_routed_tokens", "tokens routed to each expert (all MoE layers)",
                                     tag_keys=("expert",))
        self._expert_seen: dict[int, int] = {}
        self.missed = Counter("herd_prefix_cache_miss_tokens", "prompt tokens prefilled (no cache hit)")
        self.group = ExpertGroupMetrics()
        self._group_seen: dict[str, int] = {}
        self.redis = RedisMetrics()

    def record_finished(self, out: RequestOutput) -> None:
        """Token counts of a finished request (its last output)."""
        local = out.num_cached_tokens - out.num_cached_tokens_shared
        for counter, value, tags in ((self.prompt, out.num_prompt_tokens, None),
                                     (self.generated, out.num_generated_tokens, None),
                                     (self.cached, local, {"tier": "local"}),
                                     (self.cached, out.num_cached_tokens_shared, {"tier": "shared"}),
                                     (self.missed, out.num_prompt_tokens - out.num_cached_tokens, None)):
            if value > 0:  # ray's Counter refuses 0
                counter.inc(value, tags=tags)

    def record_stats(self, stats: dict[str, int]) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        for key, value in stats.items():
            if key.startswith("kv_"):
                _, group, kind = key.split("_")
                (self.kv_used if kind == "used" else self.kv_free).set(value, tags={"group": group})

    def record_expert_tokens(self, totals: list[int]) -> None:
        """Publish the growth of the per-expert routed-token totals since the last call."""
        for expert, total in enumerate(totals):
            inc_by_growth(self.expert_routed, self._expert_seen, expert, total, {"expert": str(expert)})

    def record_dispatch(self, layer: int, shard: int, num_tokens: int, seconds: float) -> None:
        self.expert_tokens.inc(num_tokens, tags={"shard": str(shard)})
        self.dispatch.observe(seconds, tags={"layer": str(layer)})

    def record_group(self, stats) -> None:
        """The expert group as this replica sees it (collective transport; `CollectiveExperts.stats`)."""
        self.group.generation.set(stats.generation, tags={"member": "replica"})
        inc_by_growth(self.group.reforms, self._group_seen, "reforms", stats.reforms, {"member": "replica"})
        inc_by_growth(self.group.failures, self._group_seen, "failures", stats.failures, {"member": "replica"})
        for shard, rows in list(stats.rows_sent.items()):
            inc_by_growth(self.expert_tokens, self._group_seen, f"shard:{shard}", rows, {"shard": str(shard)})
        waits, stats.wait_s = stats.wait_s, []
        for seconds in waits:
            self.group.wait.observe(seconds, tags={"member": "replica"})


WAIT_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1]
ROWS_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


class ExpertGroupMetrics:
    """The expert group (collective transport), exported by replicas and shards alike (tag `member`)."""

    def __init__(self) -> None:
        self.generation = Gauge("herd_expert_group_generation", "generation of the expert group this member is in",
                                tag_keys=("member",))
        self.reforms = Counter("herd_expert_group_reforms", "expert groups formed after the first",
                               tag_keys=("member",))
        self.failures = Counter("herd_expert_group_failures", "group steps failed (a member died or timed out)",
                                tag_keys=("member",))
        self.wait = Histogram("herd_expert_collective_wait_seconds", "time a member waits in the group per MoE "
                              "exchange: a replica for the shards' replies, a shard for the replicas' rows",
                              boundaries=WAIT_BUCKETS, tag_keys=("member",))


class ExpertShardMetrics:
    """One expert shard's union batches: rows per expert run, from all replicas at once."""

    def __init__(self, shard: str) -> None:
        self.tags = {"shard": shard}
        self.group = ExpertGroupMetrics()
        self.union_rows = Histogram("herd_expert_union_rows", "rows per expert run on a shard (one MoE layer, all "
                                    "replicas' rows together)", boundaries=ROWS_BUCKETS, tag_keys=("shard",))
        self.union_calls = Counter("herd_expert_union_calls", "expert runs holding rows of two or more replicas",
                                   tag_keys=("shard",))
        self._seen: dict = {}

    def publish(self, stats) -> None:
        """From `ShardStats` (deployments/expert_group.py), about once a second."""
        member = {"member": "shard-" + self.tags["shard"]}
        self.group.generation.set(stats.generation, tags=member)
        inc_by_growth(self.group.reforms, self._seen, "reforms", max(stats.groups_formed - 1, 0), member)
        inc_by_growth(self.union_calls, self._seen, "union", stats.union_calls, self.tags)
        rows, stats.union_rows = stats.union_rows, []
        for n in rows:
            self.union_rows.observe(n, tags=self.tags)
        waits, stats.waits = stats.waits, []
        for seconds in waits:
            self.group.wait.observe(seconds, tags=member)


class RedisMetrics:
    """The shared prefix-cache tier, published from the tier's cumulative counters."""

    def __init__(self) -> None:
        self.bytes_read = Counter("herd_redis_read_bytes", "KV bytes read from Redis")
        self.bytes_written = Counter("herd_redis_written_bytes", "KV bytes written to Redis")
        self.writes_dropped = Counter("herd_redis_writes_dropped", "KV chunks not written: too many bytes in flight")
        self.fetch = Histogram("herd_redis_fetch_seconds", "time to fetch and check a prompt's chunks",
                               boundaries=LATENCY_BUCKETS)
        self.skipped = Counter("herd_redis_fetches_skipped", "lookups not sent: recompute faster or Redis down")
        self.integrity = Counter("herd_redis_integrity_failures", "stored values rejected", tag_keys=("reason",))
        self.errors = Counter("herd_redis_errors", "failed Redis operations", tag_keys=("op",))
        self.up = Gauge("herd_redis_up", "1 while the shared prefix cache is reachable")
        self._seen: dict[str, int] = {}

    def publish(self, tier, store) -> None:
        self.up.set(0 if store.breaker.is_open else 1)
        for counter, key, value, tags in (
            (self.bytes_read, "read", store.stats.bytes_read, None),
            (self.bytes_written, "written", store.stats.bytes_written, None),
            (self.writes_dropped, "dropped", store.stats.writes_dropped, None),
            (self.skipped, "skipped", tier.stats.skipped, None),
            *((self.integrity, f"integrity:{r}", n, {"reason": r}) for r, n in tier.stats.integrity_failures.items()),
            *((self.errors, f"errors:{op}", n, {"op": op}) for op, n in store.stats.errors.items()),
        ):
            inc_by_growth(counter, self._seen, key, value, tags)
        seconds, tier.stats.fetch_seconds = tier.stats.fetch_seconds, []  # both on the event loop
        for s in seconds:
            self.fetch.observe(s)


class VisionMetrics:
    def __init__(self) -> None:
        self.batch_size = Histogram("herd_vision_batch_size", "images per vision batch",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.cache_hits = Counter("herd_vision_cache_hits", "image embeddings served from the cache")
