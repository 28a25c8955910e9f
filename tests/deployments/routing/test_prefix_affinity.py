"""Prefix-affinity routing without a cluster: the affinity table (chained, tenant-salted chunk
hashes, longest match, sessions, LRU bounds), the policy (overload and gone fallbacks), and the
Serve `RequestRouter` driven through Serve's own routing loop with fake replicas."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from cluster.app import _request_router
from deployments.config import HerdConfig, RoutingConfig
from deployments.routing.prefix_affinity import (
    AffinityTable,
    Decision,
    Match,
    PrefixAffinityRouter,
    decide,
    is_overloaded,
)

C = 4  # tokens per chunk in these tests
DOC = list(range(100, 100 + 3 * C))  # three chunks


def question(n: int) -> list[int]:
    return [900 + n] * (C + 1)  # one more chunk, plus a partial one


# ---- the table ---------------------------------------------------------------------------------
def test_key_hashes_whole_leading_chunks_chained_and_salted():
    t = AffinityTable(chunk_tokens=C)
    assert t.key(DOC[:C - 1]).chunks == ()  # shorter than one chunk
    assert len(t.key(DOC + [1, 2]).chunks) == 3  # the partial tail is not a chunk
    a, b = t.key(DOC), t.key(DOC + question(0))
    assert b.chunks[:3] == a.chunks  # same leading chunks, same hashes
    # Chained: an equal second chunk after a different first one hashes differently.
    other = t.key([7] * C + DOC[C:2 * C])
    assert other.chunks[1] != a.chunks[1]
    # Salted by the tenant: no hash is shared across tenants.
    assert not set(t.key(DOC, salt="acme").chunks) & set(a.chunks)
    assert t.key(DOC, session_id="s").session == ("", "s") and a.session is None


def test_longest_prefix_match_wins():
    t = AffinityTable(chunk_tokens=C)
    assert t.lookup(t.key(DOC)) is None
    t.record(t.key(DOC), "r1")
    # A different prompt that shares only the first chunk now owns that chunk...
    t.record(t.key(DOC[:C] + [5] * C), "r2")
    assert t.lookup(t.key(DOC[:C] + [6] * C)) == Match("r2", "prefix", 1)
    # ...but the document with a question still matches its three chunks on r1.
    assert t.lookup(t.key(DOC + question(1))) == Match("r1", "prefix", 3)
    assert t.lookup(t.key([1] * C * 4)) is None


def test_tenants_do_not_share_affinity():
    t = AffinityTable(chunk_tokens=C)
    t.record(t.key(DOC, salt="acme"), "r1")
    assert t.lookup(t.key(DOC + question(0), salt="acme")).replica == "r1"
    assert t.lookup(t.key(DOC + question(0), salt="globex")) is None
    assert t.lookup(t.key(DOC + question(0))) is None
    t.record(t.key([1], salt="acme", session_id="s"), "r1")
    assert t.lookup(t.key([2], salt="globex", session_id="s")) is None


def test_session_sticks_and_wins_over_prefix():
    t = AffinityTable(chunk_tokens=C)
    t.record(t.key(DOC), "r1")
    t.record(t.key([1, 2], session_id="chat-7"), "r2")  # shorter than a chunk: only the session
    assert len(t) == 3 and t.num_sessions == 1
    assert t.lookup(t.key([3, 4, 5], session_id="chat-7")) == Match("r2", "session", 0)
    assert t.lookup(t.key(DOC, session_id="chat-7")).replica == "r2"
    assert t.lookup(t.key(DOC, session_id="chat-8")) == Match("r1", "prefix", 3)


def test_lru_bounds():
    t = AffinityTable(chunk_tokens=C, max_prefix_entries=4, max_sessions=2)
    t.record(t.key(DOC), "r1")  # 3 entries
    t.record(t.key([1] * 2 * C), "r2")  # 5 -> 4: the oldest entry of DOC goes
    assert len(t) == 4
    t.record(t.key(DOC[:C]), "r1")  # touching DOC's first chunk keeps it fresh
    t.record(t.key([2] * 2 * C), "r3")
    assert len(t) == 4
    assert t.lookup(t.key(DOC)) == Match("r1", "prefix", 1)
    assert t.lookup(t.key([2] * 2 * C)) == Match("r3", "prefix", 2)
    assert t.lookup(t.key([1] * 2 * C)) == Match("r2", "prefix", 1)  # deeper chunks go first
    t.record(t.key([3] * C), "r3")
    assert t.lookup(t.key([1] * 2 * C)) is None  # then the least recently used prompt is gone
    assert t.lookup(t.key(DOC)) == Match("r1", "prefix", 1)
    # A prompt longer than the whole table keeps its leading chunks, the most shared ones.
    long = list(range(10 * C))
    t.record(t.key(long), "r4")
    assert t.lookup(t.key(long)) == Match("r4", "prefix", 4)
    for s in ("a", "b", "c"):
        t.record(t.key([], session_id=s), "r" + s)
    assert t.num_sessions == 2 and t.lookup(t.key([], session_id="a")) is None
    assert t.lookup(t.key([], session_id="c")).replica == "rc"
    with pytest.raises(ValueError):
        AffinityTable(chunk_tokens=0)


# ---- the policy --------------------------------------------------------------------------------
def test_policy_overload_and_gone_fallbacks():
    loads = {"r1": (3, 10), "r2": (0, 10)}
    m = Match("r1", "prefix", 2)
    assert decide(m, loads, loads.__getitem__, 0.5) == Decision("r1", "prefix")
    assert decide(Match("r1", "session", 0), loads, loads.__getitem__, 0.5) == Decision("r1", "session")
    assert decide(m, loads, loads.__getitem__, 0.3) == Decision(None, "overloaded")  # 3 >= 0.3 * 10
    assert decide(Match("r9", "prefix", 1), loads, loads.__getitem__, 0.5) == Decision(None, "gone")
    assert decide(None, loads, loads.__getitem__, 0.5) == Decision(None, "none")
    assert is_overloaded(None, 10, 1.0)  # did not answer the probe
    assert is_overloaded(10, 10, 1.0) and not is_overloaded(9, 10, 1.0)


# ---- the Serve request router, through Serve's routing loop -------------------------------------
class FakeReplica:
    """What Serve's routing loop reads of a `RunningReplica`."""

    def __init__(self, name: str, max_ongoing: int = 10):
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DeploymentID(name="RouterService", app_name="herd"))
        self.max_ongoing_requests = max_ongoing
        self.queue_len = 0
        self.node_id = "node"
        self.availability_zone = None
        self.multiplexed_model_ids: set[str] = set()
        self.routing_stats: dict = {}

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


class Harness:
    def __init__(self, n: int, **state):
        self.router = PrefixAffinityRouter(
            deployment_id=DeploymentID(name="RouterService", app_name="herd"),
            handle_source=DeploymentHandleSource.REPLICA,
            use_replica_queue_len_cache=True)
        self.router.initialize_state(chunk_tokens=C, **state)
        self.replicas = [FakeReplica(f"r{i}") for i in range(n)]
        self.router.update_replicas(self.replicas)

    def load(self, **queue_lens: int) -> None:
        for r in self.replicas:
            if r.replica_id.unique_id in queue_lens:
                r.queue_len = queue_lens[r.replica_id.unique_id]
                self.router.on_new_queue_len_info(r.replica_id, r.queue_len)

    async def route(self, prompt, salt: str = "", session: str = "", method: str = "generate") -> str:
        meta = RequestMetadata(request_id=uuid.uuid4().hex, internal_request_id=uuid.uuid4().hex,
                               call_method=method)
        pr = PendingRequest(args=["req", prompt, None, [], salt, session], kwargs={}, metadata=meta)
        replica = await asyncio.wait_for(self.router._choose_replica_for_request(pr), 10)
        self.router.on_request_routed(pr, replica.replica_id, None)
        return replica.replica_id.unique_id


def run(coro):
    return asyncio.run(coro)


def test_router_document_questions_stick_until_overloaded():
    async def main():
        h = Harness(2, overload_fraction=0.5)
        h.load(r0=0, r1=3)
        first = await h.route(DOC + question(0))
        assert first == "r0"  # nothing known yet: the least loaded
        h.load(r0=4, r1=0)  # busier than r1 but under 0.5 * 10
        assert [await h.route(DOC + question(i)) for i in range(1, 5)] == ["r0"] * 4
        h.load(r0=5, r1=2)  # now overloaded: the least loaded takes it and owns the prefix
        assert await h.route(DOC + question(5)) == "r1"
        h.load(r0=0, r1=4)
        assert await h.route(DOC + question(6)) == "r1"

    run(main())


def test_router_session_sticks_with_unrelated_prompts():
    async def main():
        h = Harness(2)
        h.load(r0=3, r1=0)
        assert await h.route([1, 2], session="chat-1") == "r1"
        h.load(r0=0, r1=3)
        assert await h.route(list(range(50, 50 + 3 * C)), session="chat-1") == "r1"
        assert await h.route([9], session="chat-1") == "r1"
        assert await h.route([9], session="chat-2") == "r0"  # a new session: least loaded
        assert await h.route([9]) == "r0"  # shorter than a chunk, no session: least loaded
        assert await h.route([9], salt="other-tenant", session="chat-1") == "r0"

    run(main())


def test_router_falls_back_when_the_replica_is_gone():
    async def main():
        h = Harness(3)
        h.load(r0=0, r1=5, r2=5)
        await h.route(DOC)  # two random candidates of three: any may own DOC
        owner = h.router.table.lookup(h.router.table.key(DOC)).replica
        survivors = [r for r in h.replicas if r.replica_id != owner]
        h.router.update_replicas(survivors)
        h.load(**{survivors[0].replica_id.unique_id: 1, survivors[1].replica_id.unique_id: 2})
        assert await h.route(DOC + question(0)) == survivors[0].replica_id.unique_id
        assert h.router.table.lookup(h.router.table.key(DOC)).replica == survivors[0].replica_id

    run(main())


def test_router_full_affine_replica_goes_to_the_next_rank():
    async def main():
        h = Harness(2, overload_fraction=1.0)  # soft limit off: only the hard max_ongoing_requests
        h.load(r0=0, r1=1)
        assert await h.route(DOC) == "r0"
        h.load(r0=10, r1=1)  # r0 full
        assert await h.route(DOC) == "r1"

    run(main())


def test_router_ignores_other_calls_and_bad_arguments():
    async def main():
        h = Harness(2)
        h.load(r0=0, r1=3)
        assert await h.route(DOC) == "r0"
        h.load(r0=3, r1=0)
        assert await h.route(DOC, method="stats") == "r1"  # not a generate call: no affinity
        for bad in (None, "text", [2**70] * C, ["a"] * C):
            assert await h.route(bad) == "r1"
        assert len(h.router.table) == 3

    run(main())


def test_config_wires_the_request_router():
    opts = _request_router(RoutingConfig(chunk_tokens=16))["request_router_config"]
    assert opts.get_request_router_class() is PrefixAffinityRouter
    assert opts.request_router_kwargs == {"chunk_tokens": 16, "overload_fraction": 0.5,
                                          "max_prefix_entries": 100_000, "max_sessions": 100_000}
    assert _request_router(RoutingConfig(policy="power_of_two")) == {}
    assert HerdConfig(model="m").routing.policy == "prefix_affinity"
    r = PrefixAffinityRouter(deployment_id=DeploymentID(name="RouterService", app_name="herd"),
                             handle_source=DeploymentHandleSource.REPLICA)
    r.initialize_state(**opts.request_router_kwargs)
    assert r.table.chunk_tokens == 16 and r.overload_fraction == 0.5
