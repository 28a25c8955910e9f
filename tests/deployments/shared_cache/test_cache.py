"""`SharedCache` on a real redis-server with real engines: the fetch-vs-recompute decision, what
lookups count, and that values nobody with the secret wrote are never used."""

import asyncio

import pytest
import torch

from deployments.config import RedisConfig
from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.kv_transfer import KVChunk
from deployments.engine.params import SamplingParams
from deployments.shared_cache.cache import FetchCost
from deployments.shared_cache.codec import CacheSecret, Namespace, encode
from deployments.shared_cache.setup import SharedCacheSecretError, connect_shared_cache, read_secret
from model.synth import synthesize
from tests.cluster.conftest import RedisServer

DOC = torch.randint(10, 200, (80,), generator=torch.Generator().manual_seed(2)).tolist()
SECRET_ENV = "HERD_TEST_CACHE_SECRET"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = RedisServer(tmp_path_factory.mktemp("redis"))
    yield s
    s.kill()


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "cache-secret"
    path.write_text("0123456789abcdef0123456789abcdef\n")
    return str(path)


def engine_and_tier(checkpoint, url: str, secret_file: str, **redis):
    engine = Engine.from_pretrained(checkpoint, EngineConfig(block_size=4))
    redis = {"secret_file": secret_file, **redis} if "secret_env" not in redis else redis
    tier = connect_shared_cache(RedisConfig(url=url, chunk_tokens=16, load_gbps=1.0, prefill_tokens_per_s=1e4, **redis),
                                engine, str(checkpoint))
    return engine, tier


@pytest.fixture(scope="module")
def written(tmp_path_factory, server, secret_file):
    path = tmp_path_factory.mktemp("tiny-scout")
    synthesize(path, "tiny-scout", seed=1, dtype=torch.float32, progress=False)
    engine, tier = engine_and_tier(path, server.url, secret_file, fetch_policy="always")
    engine.generate([DOC + [1]], SamplingParams(max_tokens=2, temperature=0))
    tier.store.flush()
    assert tier.store.stats.bytes_written > 0
    return path


@pytest.mark.parametrize("policy, fetched", [("always", 5), ("never", 0)])
def test_the_fetch_policy_decides(written, server, secret_file, policy, fetched):
    engine, tier = engine_and_tier(written, server.url, secret_file, fetch_policy=policy)
    chunks, _ = asyncio.run(tier.lookup(engine, DOC + [2]))
    assert len(chunks) == fetched and tier.stats.skipped == (policy == "never")


def test_auto_skips_redis_when_recomputing_is_faster(written, server, secret_file):
    engine, tier = engine_and_tier(written, server.url, secret_file, fetch_policy="auto")
    tier.cost = FetchCost("auto", load_bytes_per_s=1e3, prefill_tokens_per_s=1e4, bytes_per_token=4096)
    assert asyncio.run(tier.lookup(engine, DOC + [2]))[0] == [] and tier.stats.skipped == 1
    tier.cost = FetchCost("auto", load_bytes_per_s=1e10, prefill_tokens_per_s=1e4, bytes_per_token=4096)
    assert len(asyncio.run(tier.lookup(engine, DOC + [2]))[0]) == 5


def test_fetch_cost_compares_load_time_with_prefill_time():
    cost = FetchCost("auto", load_bytes_per_s=2e9, prefill_tokens_per_s=5000, bytes_per_token=4096, round_trip_s=1e-3)
    assert cost.worth_fetching(4096)  # 9 ms to load vs 0.8 s to prefill
    assert not cost.worth_fetching(1)  # the round trip alone costs more than one token
    assert not FetchCost("never", 1e12, 1, 1).worth_fetching(10**6)


def test_a_local_hit_is_not_fetched_again(written, server, secret_file):
    engine, tier = engine_and_tier(written, server.url, secret_file, fetch_policy="always")
    engine.generate([DOC + [3]], SamplingParams(max_tokens=1, temperature=0))
    chunks, known = asyncio.run(tier.lookup(engine, DOC + [4]))
    assert chunks == [] and tier.stats.lookups == 0  # the local cache holds every chunk


def greedy(engine, ids: list[int], chunks=(), known: int = 0) -> tuple[list[int], int]:
    """Greedy tokens of `ids` after loading `chunks`, and the prompt tokens loaded from them."""
    rid = engine.add_request(ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                             shared_chunks=chunks, num_shared_chunks=known)
    tokens, shared = [], 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                tokens += out.token_ids
                shared = max(shared, out.num_cached_tokens_shared)
    return tokens, shared


def test_a_forged_value_is_rejected_counted_and_never_cached(written, server, secret_file):
    """Someone with write access to Redis but not the secret overwrites the third chunk (its key is
    visible in Redis) with a well-formed value for that chunk: other KV, tagged without the secret."""
    engine, tier = engine_and_tier(written, server.url, secret_file, fetch_policy="always")
    ids = DOC + [5]
    digests, _ = engine.prefix_chunks(ids)
    key = tier.ns.key(digests[2])
    original = server.client().get(key)
    assert original is not None
    forger = Namespace(tier.ns.model, tier.ns.layout, CacheSecret(b"not-the-secret-0123456789"))
    g = torch.Generator().manual_seed(7)
    planted = {name: torch.randn(tier.ns.layout.shape(name), generator=g) * 50 for name, _, _ in tier.ns.layout.groups}
    try:
        server.client().set(key, bytes(encode(forger, KVChunk(2, digests[2], planted))))
        chunks, known = asyncio.run(tier.lookup(engine, ids))
        assert [c.index for c in chunks] == [0, 1]  # the good run ends at the forged value
        assert tier.stats.integrity_failures == {"mac": 1}
        tokens, shared = greedy(engine, ids, chunks, known)
        assert shared == 2 * 16
        cold = Engine.from_pretrained(written, EngineConfig(block_size=4, enable_prefix_caching=False))
        assert tokens == greedy(cold, ids)[0]
        assert greedy(engine, ids)[0] == tokens  # the local prefix cache holds only honest KV
    finally:
        server.client().set(key, original)


def test_another_secret_neither_hits_nor_reads(written, server, secret_file, monkeypatch):
    """A replica with another secret computes other keys: every chunk is a plain miss."""
    monkeypatch.setenv(SECRET_ENV, "another-secret-0123456789abcdef")
    engine, tier = engine_and_tier(written, server.url, secret_file, fetch_policy="always", secret_env=SECRET_ENV)
    digests, _ = engine.prefix_chunks(DOC + [2])
    assert all(server.client().get(tier.ns.key(d)) is None for d in digests)
    chunks, known = asyncio.run(tier.lookup(engine, DOC + [2]))
    assert chunks == [] and known == 0 and tier.stats.miss_chunks == len(digests)
    assert tier.stats.integrity_failures == {}


def test_redis_does_not_name_the_prefix(written, server, secret_file):
    """No stored key or value contains a chunk digest (what anyone can compute from a guessed prompt)."""
    engine, _ = engine_and_tier(written, server.url, secret_file, fetch_policy="never")
    digests, _ = engine.prefix_chunks(DOC + [2])
    client = server.client()
    keys = client.keys("herd:kv:*")
    stored = b" ".join(keys) + b" ".join(client.mget(keys))
    assert keys and not any(d.hex().encode() in stored or d in stored for d in digests)


@pytest.mark.parametrize("setting, value, message", [
    ({}, None, "secret_env or redis.secret_file is required"),
    ({"secret_env": SECRET_ENV}, None, f"{SECRET_ENV} .* is not set"),
    ({"secret_env": SECRET_ENV}, "short", "holds 5 bytes"),
    ({"secret_file": "/nonexistent/cache-secret"}, None, "cannot read the file /nonexistent/cache-secret"),
])
def test_a_missing_or_weak_secret_is_a_named_error(monkeypatch, setting, value, message):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    if value is not None:
        monkeypatch.setenv(SECRET_ENV, value)
    with pytest.raises(SharedCacheSecretError, match=message):
        read_secret(RedisConfig(url="redis://127.0.0.1:1", **setting))


def test_both_secret_sources_are_refused():
    with pytest.raises(ValueError, match="secret_env or secret_file, not both"):
        RedisConfig(url="redis://h", secret_env="X", secret_file="/f")
