"""`connect_shared_cache`: build a router-service replica's shared prefix-cache tier and attach it to its engine,
measuring what the fetch-vs-recompute decision needs (Redis load bandwidth, prefill speed)."""

from __future__ import annotations

import logging
import os
import time

import torch

from deployments.config import RedisConfig
from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from deployments.shared_cache.cache import FetchCost, SharedCache
from deployments.shared_cache.codec import KVLayout, Namespace
from deployments.shared_cache.store import Breaker, RedisKVStore
from model.checkpoint import fingerprint

log = logging.getLogger(__name__)
DEFAULT_LOAD_BYTES_PER_S = 1e9


def connect_shared_cache(cfg: RedisConfig, engine: Engine, model_path: str, quantization: str = "none") -> SharedCache:
    """`quantization`: the experts' on-the-fly quantization (part of the model fingerprint: it changes the KV)."""
    password = os.environ.get(cfg.password_env) if cfg.password_env else None
    if cfg.password_env and password is None:
        log.warning("redis.password_env names %s, which is not set: connecting without a password", cfg.password_env)
    text = engine.model.cfg.text
    layout = KVLayout.of(engine.kv.groups, engine.model.dtype, engine.config.block_size, cfg.chunk_tokens,
                         text.num_key_value_heads, text.head_dim)
    store = RedisKVStore(cfg.url, password, timeout_s=cfg.timeout_s, ttl_s=cfg.ttl_s,
                         max_inflight_bytes=cfg.max_inflight_mb << 20,
                         breaker=Breaker(cooldown_s=cfg.cooldown_s))
    bytes_per_token = sum(layout.bytes_per_token(name) for name, _, _ in layout.groups)
    cost = FetchCost(cfg.fetch_policy, cfg.load_gbps * 1e9 if cfg.load_gbps else measure_load(store),
                     cfg.prefill_tokens_per_s or measure_prefill(engine, cfg.chunk_tokens), bytes_per_token)
    cache = SharedCache(store, Namespace(fingerprint(model_path, quantization=quantization), layout), cost)
    engine.attach_shared_cache(cache)
    log.info("shared prefix cache at %s: %d-token chunks, %.0f KiB/token, load %.2f GB/s vs prefill %.0f tok/s "
             "(fetch policy %s)", store.url, cfg.chunk_tokens, bytes_per_token / 1024, cost.load_bytes_per_s / 1e9,
             cost.prefill_tokens_per_s, cfg.fetch_policy)
    return cache


def measure_load(store: RedisKVStore, size: int = 8 << 20, repeats: int = 3) -> float:
    """Bytes/s of reading a value of `size` from Redis (the default when Redis is down)."""
    key = f"herd:probe:{os.getpid()}"
    value = os.urandom(size)
    if not store.write_blocking(key, value, 60):
        return DEFAULT_LOAD_BYTES_PER_S
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        if store.get_many_blocking([key]) is None:
            return DEFAULT_LOAD_BYTES_PER_S
        best = max(best, size / (time.perf_counter() - start))
    return best


def measure_prefill(engine: Engine, num_tokens: int, repeats: int = 2) -> float:
    """Tokens/s of one prefill of `num_tokens` on this engine (random ids, not cached)."""
    vocab = engine.model.cfg.text.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0)
    best = 0.0
    for n in range(repeats):
        ids = torch.randint(0, vocab, (num_tokens,), generator=torch.Generator().manual_seed(n))
        ids = ids.masked_fill(ids == engine.model.cfg.image_token_index, 0).tolist()
        start = time.perf_counter()
        engine.generate([ids], params)
        best = max(best, num_tokens / (time.perf_counter() - start))
    return best
