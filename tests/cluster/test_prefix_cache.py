"""The Redis-backed prefix cache on a real cluster: 2 router-service replicas, a real redis-server, gRPC.

A document prefilled by one replica is loaded from Redis by the other and gives exactly the tokens
of a cold run; tenants never share hits; values forged without the secret are rejected; losing Redis
loses no request."""

import time

import grpc
import pytest
import torch

from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from deployments.pb import herd_pb2 as pb
from deployments.pb import herd_pb2_grpc

CHUNK = 16
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def cluster(served, redis_server, tmp_path_factory):
    secret = tmp_path_factory.mktemp("secret") / "cache-secret"
    secret.write_text("cluster-test-secret-0123456789abcdef")
    served.deploy(router_service={"num_replicas": 2, "num_cpus": 0.5}, routing={"policy": "power_of_two"},
                  redis={"url": redis_server.url, "chunk_tokens": CHUNK, "fetch_policy": "always", "cooldown_s": 1.0,
                         "secret_file": str(secret)})
    return served


@pytest.fixture(scope="module")
def cold(checkpoint):
    engine = Engine.from_pretrained(checkpoint, EngineConfig(enable_prefix_caching=False))

    def run(ids: list[int]) -> list[int]:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        return engine.generate([ids], params)[0].token_ids
    return run


def document(seed: int, n: int = 120) -> list[int]:
    return torch.randint(10, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ask(served, ids: list[int], tenant: str = "") -> pb.GenerateResponse:
    stub = herd_pb2_grpc.HerdStub(grpc.insecure_channel(served.grpc))
    sampling = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), sampling=sampling, tenant=tenant)
    return stub.GenerateUnary(request, timeout=60)


def wait_for_keys(redis_server, at_least: int, timeout_s: float = 20) -> list[bytes]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        keys = redis_server.client().keys("herd:kv:*")
        if len(keys) >= at_least:
            return keys
        time.sleep(0.1)
    raise AssertionError(f"fewer than {at_least} KV chunks were written to Redis")


def on_other_replica(served, doc: list[int], first: str, tenant: str = "", tries: int = 40):
    """Ask new questions on `doc` until one lands on a replica other than `first`."""
    for n in range(tries):
        ids = doc + [7, 100 + n, 11]
        out = ask(served, ids, tenant)
        if out.usage.replica != first:
            return ids, out
    raise AssertionError("every request went to one replica")


def test_follow_up_on_another_replica_loads_the_document_from_redis(cluster, redis_server, cold):
    redis_server.client().flushall()
    doc = document(1)
    first = ask(cluster, doc + [5, 6, 7])
    assert first.usage.cached_tokens == 0
    wait_for_keys(redis_server, (len(doc) + 2) // CHUNK)
    ids, out = on_other_replica(cluster, doc, first.usage.replica)
    assert out.usage.cached_tokens_shared == len(doc) // CHUNK * CHUNK  # the whole document's chunks
    assert list(out.token_ids) == cold(ids)
    assert cluster.metric("ray_herd_prefix_cache_hit_tokens_total", 'tier="shared"') >= len(doc) // CHUNK * CHUNK
    assert cluster.metric("ray_herd_redis_read_bytes_total") > 0


def test_tenants_never_share_hits(cluster, redis_server):
    redis_server.client().flushall()
    doc = document(2)
    ask(cluster, doc + [1], tenant="acme")
    wait_for_keys(redis_server, len(doc) // CHUNK)
    for n in range(4):  # whichever replica: neither tier may hit for another tenant
        assert ask(cluster, doc + [2, n], tenant=f"globex-{n}").usage.cached_tokens == 0
    assert ask(cluster, doc + [3], tenant="acme").usage.cached_tokens > 0


def test_a_forged_value_ends_the_hit_and_never_reaches_the_output(cluster, redis_server, cold):
    """A writer without the secret replaces the third chunk's KV (its key is visible in Redis, its
    header readable) with zeros: the value has the right key and shape but not the right MAC."""
    r = redis_server.client()
    r.flushall()
    doc = document(3)
    first = ask(cluster, doc + [1])
    keys = wait_for_keys(redis_server, len(doc) // CHUNK)
    # Keys are keyed hashes: find the third chunk's value by its header index.
    third = next(k for k in keys if b'"index": 2' in r.get(k)[:400])
    value = r.get(third)
    header_end = 12 + int.from_bytes(value[8:12], "little")
    r.set(third, value[:header_end] + bytes(len(value) - header_end))  # zero KV, zero tag
    ids, out = on_other_replica(cluster, doc, first.usage.replica)
    assert out.usage.cached_tokens_shared == 2 * CHUNK  # chunks 0 and 1, then the rejected one
    assert list(out.token_ids) == cold(ids)
    assert cluster.metric("ray_herd_redis_integrity_failures_total", 'reason="mac"') >= 1


def test_requests_survive_redis_dying_and_the_cache_comes_back(cluster, redis_server, cold):
    doc = document(4)
    stub = herd_pb2_grpc.HerdStub(grpc.insecure_channel(cluster.grpc))
    sampling = pb.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    stream = stub.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=doc), sampling=sampling), timeout=60)
    next(stream)
    redis_server.kill()  # mid-run
    assert sum(len(r.token_ids) for r in stream) == 23
    for n in range(4):
        ids = doc + [9, n]
        assert list(ask(cluster, ids).token_ids) == cold(ids)
    assert cluster.metric("ray_herd_redis_errors_total") > 0  # the logs and metrics say so
    redis_server.start()
    deadline = time.monotonic() + 30
    while not redis_server.client().keys("herd:kv:*"):  # the breaker closes, writes resume
        assert time.monotonic() < deadline, "the router-service replicas did not reconnect to Redis"
        ask(cluster, document(100 + int(time.monotonic() * 10) % 1000))
        time.sleep(0.5)
