"""The expert group on its real CPU backends (TCP sockets, and a gloo process group), without Ray:
two engine replicas and two expert shards (threads of this process, each its own group member over
TCP) in fp32 and bf16. Concurrent greedy requests on both replicas give the colocated tokens, with
one micro-batch and with two; the shards run union batches; a member that leaves fails the others
fast instead of hanging them."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

from deployments.collective_experts import HOST_ROUTING_MAX_ROWS, CollectiveExperts, rows_by_shard
from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.experts import ColocatedExperts, ExpertBackendUnavailable
from deployments.engine.params import SamplingParams
from deployments.engine.runner import split_tokens
from deployments.expert_group import GroupSpec, Message, ShardStats, Wire, serve_shard_generation
from model.checkpoint import load, load_expert_shard
from model.tokenizer import Tokenizer
from tests.deployments.replicas import run_replicas, top2_tiny_scout

ENGINE = EngineConfig(block_size=4, max_num_batched_tokens=32, max_num_seqs=4, kv_cache_bytes=8 * 2**20)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = {"a": [[5, 17, 99, 230, 41, 8], [300, 12, 77, 150]], "b": [[7, 7, 7, 100, 200], [64, 3, 2, 1, 9, 9, 40]]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return top2_tiny_scout(tmp_path_factory.mktemp("tiny-scout-top2-fp32"), torch.float32)


@pytest.fixture(scope="module")
def colocated(checkpoint):
    engine = Engine(load(checkpoint), Tokenizer.from_dir(checkpoint), ENGINE)
    return {rid: [c.token_ids for c in engine.generate(p, GREEDY)] for rid, p in PROMPTS.items()}


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    return top2_tiny_scout(tmp_path_factory.mktemp("tiny-scout-top2-bf16"), torch.bfloat16)


class Group:
    """A rendezvous store, a spec and two shard threads serving it."""

    def __init__(self, checkpoint, micro_batches: int, generation: int = 1, replicas: tuple[str, ...] = ("a", "b"),
                 backend: str = "socket", dtype: torch.dtype = torch.float32):
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.dtype = dtype
        text = load(checkpoint, experts=range(0, 0)).cfg.text
        self.spec = GroupSpec(generation=generation, host="127.0.0.1", port=self.store.port, shards=((0, 2), (2, 4)),
                              replicas=replicas, moe_layers=tuple(text.moe_layers), hidden_size=text.hidden_size,
                              top_k=text.num_experts_per_tok, capacity=ENGINE.max_num_batched_tokens,
                              dtype=dtype, micro_batches=micro_batches, timeout_s=20,
                              backend=backend)
        self.stats = [ShardStats(), ShardStats()]
        self.ended: list[str | None] = [None, None]
        self.threads = [threading.Thread(target=self._shard,
                                         args=(rank, load_expert_shard(checkpoint, range(*r), dtype=dtype)),
                                         daemon=True) for rank, r in enumerate(self.spec.shards)]
        for t in self.threads:
            t.start()

    def _shard(self, rank, experts) -> None:
        self.ended[rank] = serve_shard_generation(self.spec, rank, experts, self.stats[rank], lambda: False)

    def replica(self, checkpoint, rid: str) -> tuple[Engine, CollectiveExperts]:
        backend = CollectiveExperts(lambda after: self.spec, rid, idle_poll_s=0.005)
        return Engine(load(checkpoint, dtype=self.dtype, experts=range(0, 0)), Tokenizer.from_dir(checkpoint),
                      ENGINE, experts=backend), backend


@pytest.mark.parametrize("backend", ["socket", "gloo"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_two_replicas_two_shards_equal_colocated_with_union_batches(checkpoint, colocated, micro_batches, backend):
    group = Group(checkpoint, micro_batches, backend=backend)
    engines = {rid: group.replica(checkpoint, rid)[0] for rid in ("a", "b")}
    assert run_replicas(engines, PROMPTS, GREEDY) == colocated
    for stats in group.stats:  # both replicas' rows ran in one expert call
        assert stats.union_calls > 0 and stats.max_replicas == 2
        assert stats.rows > 0 and stats.max_rows <= 2 * ENGINE.max_num_batched_tokens


@pytest.mark.parametrize("backend", ["socket", "gloo"])
def test_bf16_two_replicas_equal_colocated(bf16_checkpoint, backend):
    """bf16 rows (two bytes per value, no numpy dtype) over each backend: the colocated bf16 tokens."""
    engine = Engine(load(bf16_checkpoint, dtype=torch.bfloat16), Tokenizer.from_dir(bf16_checkpoint), ENGINE)
    want = {rid: [c.token_ids for c in engine.generate(p, GREEDY)] for rid, p in PROMPTS.items()}
    group = Group(bf16_checkpoint, 1, backend=backend, dtype=torch.bfloat16)
    engines = {rid: group.replica(bf16_checkpoint, rid)[0] for rid in ("a", "b")}
    assert run_replicas(engines, PROMPTS, GREEDY) == want
    assert all(stats.union_calls > 0 for stats in group.stats)


@pytest.mark.parametrize("backend", ["socket", "gloo"])
def test_a_member_leaving_fails_the_others_fast(checkpoint, colocated, backend):
    """Replica b leaves mid-run (its process would have died): replica a's step raises at once (no
    hang until the 20 s timeout; the group failed under its batch, or its next step cannot begin),
    and so do the shards."""
    group = Group(checkpoint, 1, backend=backend)
    (a, _backend_a), (b, backend_b) = group.replica(checkpoint, "a"), group.replica(checkpoint, "b")
    a.add_request(PROMPTS["a"][0], GREEDY)
    b.add_request(PROMPTS["b"][0], GREEDY)
    steps_b = threading.Thread(target=lambda: [b.step() for _ in range(2)])
    steps_b.start()
    a.step()
    a.step()
    steps_b.join(30)
    backend_b.close()
    t0 = time.perf_counter()
    with pytest.raises(ExpertBackendUnavailable):  # BatchUnavailable or ExpertsNotReady
        for _ in range(4):
            a.step()
    assert time.perf_counter() - t0 < 5
    for t in group.threads:
        t.join(10)
        assert not t.is_alive()
    assert all(e is not None for e in group.ended)


def test_a_failing_micro_batch_keeps_the_group_in_step(checkpoint, colocated):
    """A request that breaks the forward pass mid-way (here: the attention of replica a's 2nd
    layer raises once) makes replica a send empty batches for the layers it has left: the group
    stays in lockstep, the engine reruns the step, and both replicas' tokens are the colocated ones."""
    group = Group(checkpoint, 2)
    (a, _), (b, _) = group.replica(checkpoint, "a"), group.replica(checkpoint, "b")
    attention = a.runner.attention
    forward, calls = attention.forward, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("a bad value")
        return forward(*args, **kwargs)

    attention.forward = flaky
    assert run_replicas({"a": a, "b": b}, PROMPTS, GREEDY) == colocated
    assert len(calls) > 2 and not any("out of step" in (e or "") for e in group.ended)


def test_a_replica_alone_messages_only_the_shards_it_has_rows_for(checkpoint):
    """In a step one replica runs alone, a shard gets a message only for the layers it has rows for,
    and one at the last layer that ends the step; the outputs are the colocated experts'."""
    group = Group(checkpoint, 1, replicas=("a",))
    backend = CollectiveExperts(lambda after: group.spec, "a")
    colocated = ColocatedExperts(load(checkpoint))
    layers, g = group.spec.moe_layers, torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(3):
            with backend.step():
                for layer in layers:
                    x = torch.randn(3, group.spec.hidden_size, generator=g)
                    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])  # experts of shard 0 only
                    scores = torch.rand(3, 2, generator=g)
                    torch.testing.assert_close(backend.run(layer, x, ids, scores), colocated.run(layer, x, ids, scores))
    backend.close()
    for t in group.threads:
        t.join(10)
    assert group.stats[0].messages == 3 * len(layers) and group.stats[0].expert_calls == 3 * len(layers)
    assert group.stats[1].messages == 3 and group.stats[1].expert_calls == 0
    assert len(layers) > 1


def test_wire_layout_keeps_dtypes_and_fits_the_capacity():
    spec = GroupSpec(generation=1, host="", port=0, shards=((0, 1),), replicas=("r",), moe_layers=(0,), hidden_size=6,
                     top_k=2, capacity=5, dtype=torch.bfloat16)
    wire = Wire(spec)
    buf = wire.buffer("cpu")
    x, ids, scores = wire.views(buf, 5)
    assert (x.dtype, ids.dtype, scores.dtype) == (torch.bfloat16, torch.int32, torch.float32)
    assert x.shape == (5, 6) and ids.shape == scores.shape == (5, 2)
    x.copy_(torch.randn(5, 6))
    ids.copy_(torch.arange(10).view(5, 2))
    scores.fill_(0.5)
    x2, ids2, scores2 = wire.views(buf, 5)  # no overlap between the arrays
    assert torch.equal(ids2, torch.arange(10, dtype=torch.int32).view(5, 2)) and bool((scores2 == 0.5).all())
    assert wire.nbytes(0) < wire.nbytes(1) < wire.nbytes(5) == buf.numel()


def test_message_header_and_views_read_what_was_written():
    spec = GroupSpec(generation=1, host="", port=0, shards=((0, 1),), replicas=("r",), moe_layers=(0,), hidden_size=4,
                     top_k=1, capacity=3, dtype=torch.float32)
    msg = Message(Wire(spec), "cpu")
    msg.write_header(3, 7, 11, 1)
    assert msg.read_header() == [3, 7, 11, 1] and msg.header.tolist() == [3, 7, 11, 1]
    x, _, _ = msg.views(3)
    x.fill_(2.0)
    assert msg.views(3)[0] is x and bool((Wire(spec).views(msg.buf, 3)[0] == 2.0).all())
    assert msg.used(3).numel() == Wire(spec).nbytes(3)


@pytest.mark.parametrize("rows", [0, 1, 5, HOST_ROUTING_MAX_ROWS, HOST_ROUTING_MAX_ROWS + 9])
def test_rows_by_shard_finds_each_shards_rows_once(rows):
    shards = ((0, 3), (3, 8), (8, 16))
    ids = torch.randint(0, 16, (rows, 2), generator=torch.Generator().manual_seed(rows))
    if rows:
        ids[0] = torch.tensor([4, 5])  # both choices on shard 1: the row is sent there once
    routed = rows_by_shard(ids, shards)
    for (start, stop), (n, idx) in zip(shards, routed, strict=True):
        want = [i for i in range(rows) if any(start <= e < stop for e in ids[i].tolist())]
        got = list(range(rows)) if idx is None else idx.tolist()
        assert n == len(want) and got == want
        assert (idx is None) == (n == rows)


def test_split_tokens_keeps_order_and_balances():
    class Chunk:
        def __init__(self, n):
            self.num_tokens = n

    chunks = [Chunk(1) for _ in range(6)] + [Chunk(6)]
    halves = split_tokens(chunks, 2)
    assert [c for h in halves for c in h] == chunks
    assert [sum(c.num_tokens for c in h) for h in halves] == [6, 6]
    assert split_tokens(chunks[:1], 2) == [chunks[:1], []]
    assert split_tokens(chunks, 1) == [chunks]
