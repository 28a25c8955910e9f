"""`connect_shared_cache`: build a router-service replica's shared prefix-cache tier and attach it to its engine,
measuring what the fetch-vs-recompute decision needs (Redis load bandwidth, prefill speed).
`read_secret`: the secret that keys and authenticates the tier's keys and values (codec.py)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from deployments.config import RedisConfig
from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from deployments.shared_cache.cache import FetchCost, SharedCache
from deployments.shared_cache.codec import MIN_SECRET_BYTES, CacheSecret, KVLayout, Namespace
from deployments.shared_cache.store import Breaker, RedisKVStore
from model.checkpoint import fingerprint

log = logging.getLogger(__name__)
DEFAULT_LOAD_BYTES_PER_S = 1e9


class SharedCacheSecretError(ValueError):
    """The shared cache's secret is not configured or cannot be read (the message says which setting)."""


def read_secret(cfg: RedisConfig) -> CacheSecret:
    """The secret named by `redis.secret_env` or `redis.secret_file` (surrounding whitespace ignored).
    There is no unauthenticated mode: without a secret anyone who can write to Redis could plant KV."""
    if cfg.secret_env:
        raw = os.environ.get(cfg.secret_env, "").strip().encode()
        where = f"the environment variable {cfg.secret_env} (redis.secret_env)"
        if not raw:
            raise SharedCacheSecretError(f"{where} is not set or empty: set it to the shared-cache secret")
    elif cfg.secret_file:
        where = f"the file {cfg.secret_file} (redis.secret_file)"
        try:
            raw = Path(cfg.secret_file).read_bytes().strip()
        except OSError as e:
            raise SharedCacheSecretError(f"cannot read {where}: {e.strerror}") from None
    else:
        raise SharedCacheSecretError("redis.secret_env or redis.secret_file is required: the shared prefix cache's "
                                     "keys and values are authenticated with a secret (herd up and the Helm chart "
                                     "make one)")
    if len(raw) < MIN_SECRET_BYTES:
        raise SharedCacheSecretError(f"{where} holds {len(raw)} bytes; the shared-cache secret needs at least "
                                     f"{MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)")
    return CacheSecret(raw)


def connect_shared_cache(cfg: RedisConfig, engine: Engine, model_path: str) -> SharedCache:
    secret = read_secret(cfg)
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
    cache = SharedCache(store, Namespace(fingerprint(model_path), layout, secret), cost)
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
