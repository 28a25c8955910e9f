"""Expert shards on a real local Ray in bf16 on the CPU, placed by the `ExpertPool`. Collective
transport: two engine replicas (threads of this process) and the two shards form the expert group
the pool hands out; greedy tokens equal the colocated ones; a shard killed mid-stream fails both
replicas' steps within 5 s, Ray restarts it, the group re-forms (a new generation) and the next
requests give the colocated tokens again. Ray transport: one MoE layer equals colocated; fp32 gate
scores and int64 expert ids are not read as bf16."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from deployments.collective_experts import CollectiveExperts
from deployments.config import ExpertsConfig
from deployments.engine.config import EngineConfig
from deployments.engine.engine import BatchUnavailable, Engine
from deployments.engine.experts import ColocatedExperts, ExpertBackendNotReady
from deployments.engine.params import SamplingParams
from deployments.expert_group import ExpertsUnavailable
from deployments.expert_shard import (
    NAMESPACE,
    POOL_NAME,
    ShardedExperts,
    from_wire,
    get_or_create_pool,
    join_expert_group,
    kill_pool,
    to_wire,
    wait_for_shards,
    wait_until_alive,
)
from deployments.process_env import SHARED_CORES_ENV, env_for_sharded, use_sharded_env
from model.checkpoint import load
from model.tokenizer import Tokenizer
from tests.deployments.replicas import run_replicas, top2_tiny_scout

DTYPE = torch.bfloat16
ENGINE = EngineConfig(block_size=4, max_num_batched_tokens=32, max_num_seqs=4, kv_cache_bytes=8 * 2**20)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = {"a": [[5, 17, 99, 230, 41, 8], [300, 12, 77, 150]], "b": [[7, 7, 7, 100, 200], [64, 3, 2, 1, 9, 9, 40]]}
EXPERTS = ExpertsConfig(mode="sharded", num_shards=2, num_cpus_per_shard=1, group_timeout_s=20, idle_poll_s=0.005)
KERNEL = "grouped"  # the shards' kernel (engine.expert_kernel), not the colocated engines' default


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return top2_tiny_scout(tmp_path_factory.mktemp("tiny-scout-top2"), DTYPE)


@pytest.fixture(scope="module")
def shards(checkpoint):
    """Two bf16 CPU shards (experts 0-1 and 2-3) placed by the ExpertPool, on a local Ray that is
    shut down after the module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="herd-tests-expert-shard",
             log_to_driver=False)
    try:
        yield wait_for_shards(get_or_create_pool(str(checkpoint), EXPERTS, "cpu", DTYPE, KERNEL), timeout_s=300)
    finally:
        kill_pool()
        ray.shutdown()


def test_wire_keeps_each_dtype_and_refuses_another():
    scores = torch.tensor([[0.75], [0.5], [0.9]])
    assert torch.equal(from_wire(to_wire(scores), torch.float32, "cpu"), scores)
    x = torch.randn(3, 4).to(DTYPE)
    assert torch.equal(from_wire(to_wire(x), DTYPE, "cpu"), x)
    with pytest.raises(TypeError, match="float32"):
        from_wire(to_wire(scores), DTYPE, "cpu")  # fp32 bits read as bf16 pairs would be garbage
    with pytest.raises(TypeError):
        from_wire(to_wire(x), torch.float32, "cpu")


@torch.inference_mode()
def test_shards_run_with_the_openmp_settings_of_a_sharded_deployment(shards, monkeypatch):
    """Each shard process got `SHARED_CORES_ENV` (its OpenMP threads spin briefly: deployments/process_env.py),
    unless the node's environment sets the variable itself."""
    import ray

    infos = ray.get([handle.info.remote() for handle, _ in shards], timeout=60)
    for info in infos:
        raw = Path(f"/proc/{info['pid']}/environ").read_bytes().split(b"\0")
        environ = dict(v.decode().split("=", 1) for v in raw if b"=" in v)
        for name, value in SHARED_CORES_ENV.items():
            assert environ.get(name) == value
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    assert "GOMP_SPINCOUNT" not in env_for_sharded()
    mine, bare = {"GOMP_SPINCOUNT": "5"}, {}  # what the benchmarks standing in for a replica do
    use_sharded_env(mine)
    use_sharded_env(bare)
    assert mine == {"GOMP_SPINCOUNT": "5"} and bare == SHARED_CORES_ENV


def test_sharded_bf16_layer_equals_colocated(shards, checkpoint):
    model = load(checkpoint, dtype=DTYPE)
    colocated, sharded = ColocatedExperts(model), ShardedExperts(shards, timeout_s=120)
    gen = torch.Generator().manual_seed(0)
    for layer in model.cfg.text.moe_layers:
        x = torch.randn(24, model.cfg.text.hidden_size, generator=gen).to(DTYPE)
        expert_ids, scores = model.language_model.model.layers[layer].feed_forward.router.route(x)
        assert scores.dtype == torch.float32 and expert_ids.dtype == torch.int64
        assert len({i < 2 for i in expert_ids.flatten().tolist()}) == 2  # both shards get tokens
        ref = colocated.run(layer, x, expert_ids, scores)
        got = sharded.run(layer, x, expert_ids, scores)
        assert got.dtype == DTYPE and got.shape == ref.shape
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.fixture(scope="module")
def colocated(checkpoint):
    engine = Engine(load(checkpoint, dtype=DTYPE), Tokenizer.from_dir(checkpoint), ENGINE)
    return {rid: [c.token_ids for c in engine.generate(p, GREEDY)] for rid, p in PROMPTS.items()}


def replica(checkpoint, rid: str) -> Engine:
    """An engine replica in the pool's expert group (as a router-service replica joins it)."""
    def pool():
        return get_or_create_pool(str(checkpoint), EXPERTS, "cpu", DTYPE, KERNEL)

    backend = CollectiveExperts(lambda after: join_expert_group(pool, rid, ENGINE.max_num_batched_tokens, after, 60),
                                rid, idle_poll_s=EXPERTS.idle_poll_s)
    return Engine(load(checkpoint, dtype=DTYPE, experts=range(0, 0)), Tokenizer.from_dir(checkpoint), ENGINE,
                  experts=backend)


def test_collective_bf16_two_replicas_equal_colocated_with_union_batches(shards, checkpoint, colocated):
    import ray

    pool = ray.get_actor(POOL_NAME, namespace=NAMESPACE)
    engines = {rid: replica(checkpoint, rid) for rid in ("a", "b")}
    assert run_replicas(engines, PROMPTS, GREEDY) == colocated
    stats = ray.get(pool.shard_stats.remote())
    assert all(s["union_calls"] > 0 and s["max_replicas"] == 2 for s in stats), stats
    assert sorted(ray.get(pool.group.remote())["replicas"]) == ["a", "b"]


def test_killed_shard_fails_both_replicas_fast_then_the_group_reforms(shards, checkpoint, colocated):
    import ray

    pool = ray.get_actor(POOL_NAME, namespace=NAMESPACE)
    engines = {rid: replica(checkpoint, rid) for rid in ("a", "b")}
    long = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
    for rid, engine in engines.items():
        engine.add_request(PROMPTS[rid][0], long)
    failed: dict = {}
    stepping = threading.Barrier(3)

    def serve(rid: str) -> None:
        engine = engines[rid]
        try:
            deadline = time.monotonic() + 90
            while True:  # joins the group (replicas joining at once may need a second generation)
                try:
                    engine.step()
                    break
                except ExpertsUnavailable:
                    if time.monotonic() > deadline:
                        raise
        finally:
            stepping.wait(120)
        try:
            while True:
                engine.step()
        except Exception as e:
            failed[rid] = (time.perf_counter(), e)

    threads = [threading.Thread(target=serve, args=(rid,)) for rid in engines]
    for t in threads:
        t.start()
    stepping.wait(180)
    time.sleep(0.5)
    before = ray.get(pool.group.remote())["generation"]
    ray.kill(shards[0][0], no_restart=False)
    killed = time.perf_counter()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a replica hung on the dead shard"
    assert set(failed) == {"a", "b"}
    # A replica the kill caught inside a step fails that step naming its requests (in flight: the router
    # service fails them with UNAVAILABLE); one it caught between steps cannot begin the next one
    # (ExpertBackendNotReady: nothing of it ran, its requests are kept and the router service retries).
    for rid, (_, e) in failed.items():
        if isinstance(e, BatchUnavailable):
            assert e.request_ids == list(engines[rid]._states), (rid, e)
        else:
            assert isinstance(e, ExpertBackendNotReady) and engines[rid].has_unfinished(), (rid, e)
    assert all(when - killed < 5 for when, _ in failed.values()), {k: w - killed for k, (w, _) in failed.items()}
    for engine in engines.values():  # give up the requests (as the router service does after its wait)
        for request_id in list(engine._states):
            engine.abort(request_id)
    wait_until_alive([shards[0][0]], 120)  # Ray restarted the shard (it reloaded its experts)
    assert run_replicas(engines, PROMPTS, GREEDY) == colocated  # re-forms with the restarted shard
    assert ray.get(pool.group.remote())["generation"] > before


def test_kill_pool_kills_shards_placement_group_and_pool(shards):
    """Last in this module: it kills the pool the `shards` fixture made (its teardown then finds none)."""
    import ray
    from ray.util import placement_group_table

    pool = ray.get_actor(POOL_NAME, namespace=NAMESPACE)
    pg = ray.get(pool.get_placement_group.remote())
    assert kill_pool() is True
    with pytest.raises(ValueError):
        ray.get_actor(POOL_NAME, namespace=NAMESPACE)
    for handle, _ in shards:  # killed with no restart
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.info.remote(), timeout=60)
    assert placement_group_table(pg)["state"] == "REMOVED"
    assert kill_pool() is False  # no pool: nothing to do


def test_int4_shards_quantize_their_slice_and_equal_colocated_int4(shards, checkpoint):
    """After the kill test (the `shards` fixture keeps Ray up): a pool of int4 shards. Each quantizes only
    its own experts (half of the model's int4 expert bytes each), and greedy tokens through them equal
    those of the colocated int4 model."""
    import ray

    from model.moe import Experts
    from model.quantization import module_bytes

    cfg = ExpertsConfig(mode="sharded", num_shards=2, num_cpus_per_shard=1, quantization="int4")
    try:
        int4_shards = wait_for_shards(get_or_create_pool(str(checkpoint), cfg, "cpu", DTYPE), timeout_s=300)
        colocated_model = load(checkpoint, dtype=DTYPE, quantization="int4")
        total = sum(module_bytes(m) for m in colocated_model.modules() if isinstance(m, Experts))
        infos = ray.get([handle.info.remote() for handle, _ in int4_shards], timeout=60)
        assert [i["weights"] for i in infos] == [["Int4ExpertWeights"]] * 2
        assert [i["expert_bytes"] for i in infos] == [total // 2] * 2
        engine_cfg = EngineConfig(block_size=4, max_num_batched_tokens=32, max_num_seqs=4, kv_cache_bytes=8 * 2**20)
        tok = Tokenizer.from_dir(checkpoint)
        colocated = Engine(colocated_model, tok, engine_cfg)
        sharded = Engine(load(checkpoint, dtype=DTYPE, experts=range(0, 0)), tok, engine_cfg,
                         experts=ShardedExperts(int4_shards, timeout_s=120))
        prompts = [[5, 17, 99, 230, 41, 8], [300, 12, 77, 150]]
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        assert [c.token_ids for c in sharded.generate(prompts, params)] == \
            [c.token_ids for c in colocated.generate(prompts, params)]
    finally:
        kill_pool()
