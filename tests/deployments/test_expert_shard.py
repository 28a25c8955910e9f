"""Expert shards on a real local Ray in bf16 on the CPU: the sharded experts give what the
colocated ones give (one MoE layer, and greedy generation through the engine). The engine sends
fp32 gate scores and int64 expert ids whatever the model dtype; the shards must not read them as
bf16."""

from __future__ import annotations

import json

import pytest
import torch

from deployments.config import ExpertsConfig
from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.experts import ColocatedExperts
from deployments.engine.params import SamplingParams
from deployments.expert_shard import (
    NAMESPACE,
    POOL_NAME,
    ShardedExperts,
    from_wire,
    get_or_create_pool,
    kill_pool,
    to_wire,
    wait_for_shards,
)
from model.checkpoint import load
from model.synth import synthesize
from model.tokenizer import Tokenizer

DTYPE = torch.bfloat16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """tiny-scout with top-2 routing, so that a token's experts can sit on both shards."""
    path = tmp_path_factory.mktemp("tiny-scout-top2")
    synthesize(path, "tiny-scout", seed=7, dtype=DTYPE, progress=False)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["num_experts_per_tok"] = 2
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def shards(checkpoint):
    """Two bf16 CPU shards (experts 0-1 and 2-3) placed by the ExpertPool, on a local Ray that is
    shut down after the module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="herd-tests-expert-shard",
             log_to_driver=False)
    try:
        cfg = ExpertsConfig(mode="sharded", num_shards=2, num_cpus_per_shard=1)
        yield wait_for_shards(get_or_create_pool(str(checkpoint), cfg, "cpu", DTYPE, kernel="grouped"), timeout_s=300)
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


def test_sharded_bf16_greedy_equals_colocated(shards, checkpoint):
    cfg = EngineConfig(block_size=4, max_num_batched_tokens=32, max_num_seqs=4, kv_cache_bytes=8 * 2**20)
    tok = Tokenizer.from_dir(checkpoint)
    colocated = Engine(load(checkpoint, dtype=DTYPE), tok, cfg)
    sharded = Engine(load(checkpoint, dtype=DTYPE, experts=range(0, 0)), tok, cfg,
                     experts=ShardedExperts(shards, timeout_s=120))
    prompts = [[5, 17, 99, 230, 41, 8], [300, 12, 77, 150]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = [c.token_ids for c in colocated.generate(prompts, params)]
    got = [c.token_ids for c in sharded.generate(prompts, params)]
    assert got == want


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
