"""`SharedCache` on a real redis-server with real engines: the fetch-vs-recompute decision, and what
lookups count."""

import asyncio

import pytest
import torch

from deployments.config import RedisConfig
from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from deployments.shared_cache.cache import FetchCost
from deployments.shared_cache.setup import connect_shared_cache
from model.synth import synthesize
from tests.cluster.conftest import RedisServer

DOC = torch.randint(10, 200, (80,), generator=torch.Generator().manual_seed(2)).tolist()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = RedisServer(tmp_path_factory.mktemp("redis"))
    yield s
    s.kill()


def engine_and_tier(checkpoint, url: str, **redis):
    engine = Engine.from_pretrained(checkpoint, EngineConfig(block_size=4))
    tier = connect_shared_cache(RedisConfig(url=url, chunk_tokens=16, load_gbps=1.0, prefill_tokens_per_s=1e4, **redis),
                        engine, str(checkpoint))
    return engine, tier


@pytest.fixture(scope="module")
def written(tmp_path_factory, server):
    path = tmp_path_factory.mktemp("tiny-scout")
    synthesize(path, "tiny-scout", seed=1, dtype=torch.float32, progress=False)
    engine, tier = engine_and_tier(path, server.url, fetch_policy="always")
    engine.generate([DOC + [1]], SamplingParams(max_tokens=2, temperature=0))
    tier.store.flush()
    assert tier.store.stats.bytes_written > 0
    return path


@pytest.mark.parametrize("policy, fetched", [("always", 5), ("never", 0)])
def test_the_fetch_policy_decides(written, server, policy, fetched):
    engine, tier = engine_and_tier(written, server.url, fetch_policy=policy)
    chunks, _ = asyncio.run(tier.lookup(engine, DOC + [2]))
    assert len(chunks) == fetched and tier.stats.skipped == (policy == "never")


def test_auto_skips_redis_when_recomputing_is_faster(written, server):
    engine, tier = engine_and_tier(written, server.url, fetch_policy="auto")
    tier.cost = FetchCost("auto", load_bytes_per_s=1e3, prefill_tokens_per_s=1e4, bytes_per_token=4096)
    assert asyncio.run(tier.lookup(engine, DOC + [2]))[0] == [] and tier.stats.skipped == 1
    tier.cost = FetchCost("auto", load_bytes_per_s=1e10, prefill_tokens_per_s=1e4, bytes_per_token=4096)
    assert len(asyncio.run(tier.lookup(engine, DOC + [2]))[0]) == 5


def test_fetch_cost_compares_load_time_with_prefill_time():
    cost = FetchCost("auto", load_bytes_per_s=2e9, prefill_tokens_per_s=5000, bytes_per_token=4096, round_trip_s=1e-3)
    assert cost.worth_fetching(4096)  # 9 ms to load vs 0.8 s to prefill
    assert not cost.worth_fetching(1)  # the round trip alone costs more than one token
    assert not FetchCost("never", 1e12, 1, 1).worth_fetching(10**6)


def test_a_local_hit_is_not_fetched_again(written, server):
    engine, tier = engine_and_tier(written, server.url, fetch_policy="always")
    engine.generate([DOC + [3]], SamplingParams(max_tokens=1, temperature=0))
    chunks, known = asyncio.run(tier.lookup(engine, DOC + [4]))
    assert chunks == [] and tier.stats.lookups == 0  # the local cache holds every chunk
