"""Prefix-affinity routing on a real local Ray + Serve with two router-service replicas: a long document
followed by different questions stays on one replica (and hits its local prefix cache), a session
sticks to its replica whatever its prompts, and the power-of-two policy still deploys."""

from __future__ import annotations

import pytest

from cluster.client import HerdClient
from deployments.pb import herd_pb2 as pb

CHUNK = 16  # tokens per affinity chunk here (the engine's KV block is 16 too)


@pytest.fixture(scope="module")
def two_routers(served):
    served.deploy(router_service={"num_replicas": 2, "num_cpus": 0.5}, vision={"num_cpus": 0.5},
                  routing={"policy": "prefix_affinity", "chunk_tokens": CHUNK})
    return served


def generate(served, ids: list[int], session: str = "", tenant: str = "") -> pb.Usage:
    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), session_id=session, tenant=tenant,
                                 sampling=pb.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    *_, last = HerdClient(served.grpc, timeout_s=60).generate(request)
    assert last.finish_reason == "length"
    return last.usage


def document(seed: int) -> list[int]:
    return [1] + [(seed * 37 + i * 11) % 400 + 20 for i in range(5 * CHUNK - 1)]  # five chunks


def test_document_and_its_questions_stay_on_one_replica(two_routers):
    for seed in range(3):  # three documents: pow2 keeps 5 in a row together with chance (1/16)^3
        doc = document(seed)
        usages = [generate(two_routers, doc + [430 + q, 431 + q, 432 + q]) for q in range(5)]
        replicas = {u.replica for u in usages}
        assert len(replicas) == 1 and "" not in replicas, replicas
        # The point of it: every follow-up reuses the document's KV from that replica's cache.
        assert all(u.cached_tokens >= len(doc) - CHUNK for u in usages[1:]), [u.cached_tokens for u in usages]


def test_session_sticks_to_its_replica(two_routers):
    for s in range(4):
        session = f"session-{s}"
        first = generate(two_routers, [1, 40 + s, 41, 42], session=session).replica
        unrelated = [generate(two_routers, [1] + [200 + s + i for i in range(3 * CHUNK)], session=session).replica,
                     generate(two_routers, [1, 300 + s], session=session).replica]
        assert unrelated == [first, first]


def test_power_of_two_policy_deploys(served):
    served.deploy(router_service={"num_replicas": 2, "num_cpus": 0.5}, vision={"num_cpus": 0.5},
                  routing={"policy": "power_of_two"})
    assert generate(served, [1, 5, 6, 7], session="x").replica
