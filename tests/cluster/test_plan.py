"""`herd plan` against the real Llama 4 Scout (109B total, 17B active, 16 experts) and Maverick (400B
total, 17B active, 128 experts, dense/MoE interleaved) configs that `herd synth --config-only` writes.
Every expected number is computed here by hand from the published shapes, not by the code under test."""

import json
import math

import pytest

from cluster.cli import main
from cluster.plan import (
    PlanDoesNotFit,
    check_fits,
    count_params,
    make_plan,
    plan_for_config,
    read_fp8_config,
    read_weight_dtype,
)
from deployments.config import HerdConfig
from model.config import Llama4Config

GIB = 2**30
# Llama 4 Scout / Maverick text shapes (model/presets.py, the released config.json files)
H, INTER, I_MLP, L, HEADS, KV_HEADS, HD, V, CHUNK = 5120, 8192, 16384, 48, 40, 8, 128, 202048, 8192
# the vision tower: 34 layers of width 1408 (MLP 5632), 14px patches of 336px tiles, projector 4096 -> 5120
VH, VI, VL, PATCH, SIDE, PROJ = 1408, 5632, 34, 14, 336 // 14, 4096
BF16 = 2


def vision_params() -> int:
    per_layer = 4 * (VH * VH + VH) + (VH * VI + VI) + (VI * VH + VH) + 2 * 2 * VH  # attention, MLP, 2 LayerNorms
    return (VH  # class embedding
            + (SIDE * SIDE + 1) * VH  # positional embedding (patches + class token)
            + 3 * PATCH * PATCH * VH  # patch embedding, no bias
            + 2 * 2 * VH  # LayerNorm pre and post
            + VL * per_layer
            + VI * PROJ + PROJ * PROJ  # pixel-shuffle adapter MLP, no bias
            + PROJ * H)  # multi-modal projector, no bias


ATTENTION = H * HEADS * HD + 2 * H * KV_HEADS * HD + HEADS * HD * H  # q, k, v, o per layer
EXPERT = 3 * H * INTER  # gate, up, down of one expert in one layer (= the shared expert)


def hand(num_experts: int, moe_layers: int) -> dict:
    dense_layers = L - moe_layers
    parts = dict(embeddings=V * H, lm_head=V * H, attention=L * ATTENTION, norms=2 * H * L + H,
                 dense_mlp=dense_layers * 3 * H * I_MLP, shared_experts=moe_layers * EXPERT,
                 moe_gates=moe_layers * H * num_experts, routed_experts=moe_layers * num_experts * EXPERT,
                 vision=vision_params(), other=0)
    dense = sum(v for k, v in parts.items() if k not in ("routed_experts", "vision"))
    return dict(parts=parts, dense=dense, total=dense + parts["routed_experts"] + parts["vision"],
                active=dense + moe_layers * EXPERT)  # top-1: one routed expert per MoE layer


SCOUT, MAVERICK = hand(16, 48), hand(128, 24)


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    out = tmp_path_factory.mktemp("scout")
    assert main(["synth", "--preset", "scout", "--config-only", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def maverick(tmp_path_factory):
    out = tmp_path_factory.mktemp("maverick")
    assert main(["synth", "--preset", "maverick", "--config-only", "--out", str(out)]) == 0
    return out


def plan_of(path, gpus=8, gib=80, **kw):
    return make_plan(Llama4Config.from_dir(path), gpus, gib * GIB, weight_dtype=read_weight_dtype(path), **kw)


@pytest.mark.parametrize("name, expected, total", [("scout", SCOUT, 109e9), ("maverick", MAVERICK, 400e9)])
def test_parameter_counts_match_the_published_shapes(name, expected, total, request):
    cfg = Llama4Config.from_dir(request.getfixturevalue(name))
    counts = count_params(cfg)
    assert {k: getattr(counts, k) for k in expected["parts"]} == expected["parts"]
    plan = make_plan(cfg, 8, 80 * GIB)
    assert plan.total_params == expected["total"] and plan.active_params == expected["active"]
    assert abs(plan.total_params / total - 1) < 0.01  # 108.64 B, 401.58 B
    assert round(plan.active_params / 1e9) == 17  # 17.17 B, 17.18 B
    assert (plan.dense_bytes, plan.expert_bytes, plan.vision_bytes) == (
        BF16 * expected["dense"], BF16 * expected["parts"]["routed_experts"], BF16 * expected["parts"]["vision"])


def test_scout_on_eight_80gib_gpus(scout):
    plan = plan_of(scout)
    per_expert = 48 * EXPERT * BF16  # 11.25 GiB: one expert over 48 MoE layers
    usable = int(80 * GIB * 0.9)
    assert usable // per_expert == 6  # 6 experts = 67.5 GiB fit 72 GiB, 7 = 78.75 GiB do not
    assert (plan.num_expert_shards, plan.experts_per_shard, plan.shard_bytes) == (3, 6, 6 * per_expert)
    assert plan.num_gpus == 4 and plan.fits and plan.warnings == ()
    assert plan.replica_bytes == BF16 * (SCOUT["dense"] + SCOUT["parts"]["vision"])  # the replica loads vision too
    assert plan.kv_cache_bytes == usable - plan.replica_bytes
    check_fits(plan)  # no exception
    assert plan.herd_config()["experts"] == {"mode": "sharded", "num_shards": 3, "num_gpus_per_shard": 1}


def test_kv_bytes_per_token(scout):
    for dtype, size in (("bf16", 2), ("fp16", 2), ("fp32", 4), ("fp8", 1)):
        plan = plan_of(scout, kv_dtype=dtype)
        assert plan.kv_bytes_per_token == 2 * L * KV_HEADS * HD * size  # K and V of every layer
        assert (plan.num_full_layers, plan.num_chunked_layers) == (12, 36)  # NoPE: every 4th layer
        assert plan.kv_bytes_per_token_full == 2 * 12 * KV_HEADS * HD * size
        assert plan.kv_bytes_per_token_chunked == 2 * 36 * KV_HEADS * HD * size
    assert plan_of(scout).kv_bytes_per_token == 196608  # 192 KiB


def test_kv_capacity_chunked_layers_keep_one_chunk_per_sequence(scout):
    """Engine defaults: 16-token blocks, 64 sequences, 1024-token steps. The chunked layers get what 64
    sequences can use of their chunk, at most half the memory; the full-history layers get the rest."""
    plan = plan_of(scout)
    kv = plan.kv_cache_bytes
    full_block, chunked_block = 16 * 2 * 12 * KV_HEADS * HD * BF16, 16 * 2 * 36 * KV_HEADS * HD * BF16
    per_seq = CHUNK // 16 + 1024 // 16 + 1  # a chunk plus one step straddling into the next
    chunked = min(64 * per_seq, kv // 2 // chunked_block)
    assert plan.kv_tokens_per_replica == (kv - chunked * chunked_block) // full_block * 16
    assert plan.kv_full_chunk_seqs == chunked // per_seq
    # were every layer full-history, the same memory would hold fewer tokens
    full_only = make_plan(Llama4Config.from_dir(scout).with_text(attention_chunk_size=None), 8, 80 * GIB)
    assert (full_only.num_full_layers, full_only.num_chunked_layers, full_only.kv_full_chunk_seqs) == (48, 0, 0)
    assert full_only.kv_tokens_per_replica == kv // (16 * plan.kv_bytes_per_token) * 16
    assert full_only.kv_tokens_per_replica < plan.kv_tokens_per_replica


def test_maverick_bf16_does_not_fit_eight_80gib_gpus(maverick):
    plan = plan_of(maverick)
    per_expert = 24 * EXPERT * BF16  # 5.625 GiB over 24 MoE layers: 12 per GPU
    assert (plan.num_expert_shards, plan.experts_per_shard) == (math.ceil(128 / 12), 12)
    assert plan.num_gpus == 12 and not plan.fits
    assert plan.shard_bytes == 12 * per_expert
    assert len(plan.warnings) == 1 and "needs 12 GPUs" in plan.warnings[0] and "add 4 GPUs" in plan.warnings[0]
    with pytest.raises(PlanDoesNotFit, match="needs 12 GPUs"):
        check_fits(plan)
    assert plan_of(maverick, gpus=16).fits


def test_too_few_shards_or_too_small_gpus_say_what_to_change(scout):
    two = plan_of(scout, num_expert_shards=2)  # 8 experts = 90 GiB on one 80 GiB GPU
    assert not two.fits and any("use at least 3 shards" in w for w in two.warnings)
    small = plan_of(scout, gib=10)  # 9 GiB usable: neither the replica's 22.4 GiB nor one 11.25 GiB expert fit
    assert not small.fits
    # the smallest GPU for a replica: its weights plus the smallest KV cache the engine lays out (one chunk of
    # the chunked layers for one sequence + 2 blocks of the full-history layers), over 90%
    block = 16 * 2 * KV_HEADS * HD * BF16  # one 16-token block of one layer
    smallest_kv = (CHUNK // 16 + 1024 // 16 + 1) * 36 * block + 2 * 12 * block
    need = math.ceil((small.replica_bytes + smallest_kv) / 0.9 / GIB * 10) / 10  # rounded up: enough
    assert any("router-service replica's weights" in w and f"at least {need:.1f} GiB" in w for w in small.warnings)
    assert any("one routed expert (11.2 GiB over 48 MoE layers)" in w and "at least 12.5 GiB" in w
               for w in small.warnings)
    assert not any("GPUs (" in w for w in small.warnings)  # no shard count helps an expert that fits no GPU
    edge = plan_of(scout, gpus=16, gib=need)  # just enough: a few hundred tokens of KV
    assert edge.fits and 0 < edge.kv_tokens_per_replica < 1000 and edge.kv_full_chunk_seqs == 1
    assert not plan_of(scout, gpus=16, gib=need - 0.1).fits
    assert any("one routed expert (11.2 GiB over 48 MoE layers)" in w for w in small.warnings)
    too_many = plan_of(scout, num_expert_shards=17, gpus=32)
    assert not too_many.fits and any("use at most 16" in w for w in too_many.warnings)


def test_colocated_when_one_gpu_holds_the_whole_model(tmp_path):
    assert main(["synth", "--preset", "small-scout", "--config-only", "--out", str(tmp_path)]) == 0
    plan = plan_of(tmp_path, gpus=1)
    assert (plan.num_expert_shards, plan.num_gpus, plan.fits) == (0, 1, True)
    assert plan.replica_bytes == plan.dense_bytes + plan.vision_bytes + plan.expert_bytes
    assert plan.herd_config()["experts"] == {"mode": "colocated"}
    assert plan_of(tmp_path, gpus=2).num_expert_shards == 1  # with a GPU to spare the experts are sharded


def test_shard_sizes_agree_with_split_experts():
    from deployments.expert_shard import split_experts

    for experts in (16, 128):
        for shards in range(1, experts + 1):
            assert max(map(len, split_experts(experts, shards))) == math.ceil(experts / shards)


def test_byte_counts_agree_with_a_written_checkpoint(checkpoint):
    """The tiny-scout checkpoint of the cluster tests (float32 weights): plan bytes = tensor bytes on disk."""
    from safetensors import safe_open

    total = 0
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys())
    plan = plan_of(checkpoint, gpus=1, gib=1)
    assert plan.weight_dtype == "fp32"
    assert plan.dense_bytes + plan.expert_bytes + plan.vision_bytes == total


def test_weight_dtype_comes_from_the_config(tmp_path, scout):
    cfg = json.loads((scout / "config.json").read_text())
    for torch_dtype, name in (("float32", "fp32"), ("float16", "fp16"), (None, "bf16")):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": torch_dtype}))
        assert read_weight_dtype(tmp_path) == name
    assert plan_of(tmp_path).dense_bytes == BF16 * SCOUT["dense"]
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}))
    assert plan_of(tmp_path).dense_bytes == 4 * SCOUT["dense"]


def test_plan_for_a_herd_config(scout):
    from deployments.config import HerdConfig

    cfg = HerdConfig(model=str(scout), experts={"mode": "sharded", "num_shards": 3, "num_gpus_per_shard": 1},
                     engine={"kv_cache_bytes": 40 * GIB})
    plan = plan_for_config(cfg, gpus=4, gpu_memory_bytes=80 * GIB)
    assert (plan.num_expert_shards, plan.num_gpus, plan.kv_cache_bytes, plan.fits) == (3, 4, 40 * GIB, True)
    big_kv = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"kv_cache_bytes": 60 * GIB})})
    with pytest.raises(PlanDoesNotFit, match="lower it to at most"):
        check_fits(plan_for_config(big_kv, gpus=4, gpu_memory_bytes=80 * GIB))
    with pytest.raises(PlanDoesNotFit, match="needs 4 GPUs"):
        check_fits(plan_for_config(cfg, gpus=3, gpu_memory_bytes=80 * GIB))


# ---- the CLI ------------------------------------------------------------------------------------


def test_cli_json(scout, capsys):
    assert main(["plan", "--model", str(scout), "--gpus", "8", "--gpu-memory", "80", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"total_params", "active_params", "dense_bytes", "expert_bytes", "vision_bytes", "num_expert_shards",
            "num_gpus", "kv_bytes_per_token", "kv_tokens_per_replica", "fits", "warnings"} <= set(out)
    assert (out["total_params"], out["active_params"]) == (SCOUT["total"], SCOUT["active"])
    assert (out["num_expert_shards"], out["num_gpus"], out["kv_bytes_per_token"], out["fits"]) == (3, 4, 196608, True)


def test_cli_table_and_exit_status(scout, maverick, capsys):
    assert main(["plan", "--model", str(scout), "--gpus", "8", "--gpu-memory", "80"]) == 0
    table = capsys.readouterr().out
    assert "108.64 B total, 17.17 B active" in table and "fits" in table and "3 x 1 GPU" in table
    assert main(["plan", "--model", str(maverick), "--gpus", "8", "--gpu-memory", "80", "--kv-dtype", "fp8"]) == 1
    table = capsys.readouterr().out
    assert "NO" in table and "warning: needs 12 GPUs" in table and "96 KiB fp8" in table


@pytest.mark.parametrize("args, message, status", [
    (["--model", "/nonexistent/model", "--gpus", "8", "--gpu-memory", "80"], "config.json not found", 1),
    (["--gpus", "0", "--gpu-memory", "80"], "gpus must be at least 1", 2),
    (["--gpus", "8", "--gpu-memory", "0"], "--gpu-memory must be positive", 2),
    (["--gpus", "8", "--gpu-memory", "80", "--headroom", "1.5"], "headroom must be a fraction", 2),
])
def test_cli_bad_input_is_one_line(scout, capsys, args, message, status):
    """A bad checkpoint is bad input (1), arguments that do not go together a usage error (2)."""
    if "--model" not in args:
        args = ["--model", str(scout), *args]
    assert main(["plan", *args]) == status
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_refuses_an_unknown_quantization_method(tmp_path, scout, capsys):
    cfg = json.loads((scout / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "awq"}}))
    assert main(["plan", "--model", str(tmp_path), "--gpus", "8", "--gpu-memory", "80"]) == 1
    assert "quant_method 'awq' is not supported" in capsys.readouterr().err


def test_quantized_experts_shrink_the_plan(scout):
    """Scout's ~98B routed-expert parameters: ~196 GB in bf16, half in FP8, a quarter in int4 (scales
    included); int4 puts the whole of Scout on one 80 GiB GPU, bf16 needs expert shards."""
    bf16, fp8, int4 = (plan_of(scout, expert_quantization=q) for q in ("none", "fp8", "int4"))
    assert 0.5 < fp8.expert_bytes / bf16.expert_bytes < 0.501
    assert 0.25 < int4.expert_bytes / bf16.expert_bytes < 0.26
    assert bf16.dense_bytes == fp8.dense_bytes == int4.dense_bytes
    one_gpu = [plan_of(scout, gpus=1, expert_quantization=q) for q in ("none", "int4")]
    assert not one_gpu[0].fits and one_gpu[1].fits and one_gpu[1].num_expert_shards == 0
    assert one_gpu[1].herd_config()["experts"] == {"mode": "colocated", "quantization": "int4"}


def test_meta_fp8_checkpoint_is_sized_as_stored(tmp_path, maverick, capsys):
    """Maverick in Meta's FP8 layout: FP8 experts and FP8 shared experts / dense MLPs (as its
    modules_to_not_convert leaves them), attention and lm_head in bf16; fits one 8 x 80 GiB node."""
    from model.synth import FP8_MODULES_TO_NOT_CONVERT

    cfg = json.loads((maverick / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                  "modules_to_not_convert": FP8_MODULES_TO_NOT_CONVERT}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    bf16, fp8 = plan_of(maverick), plan_of(tmp_path, fp8_checkpoint=read_fp8_config(tmp_path))
    assert fp8.expert_quantization == "fp8" and fp8.expert_bytes < 0.51 * bf16.expert_bytes
    assert 0.5 * bf16.dense_bytes < fp8.dense_bytes < bf16.dense_bytes  # shared experts and dense MLPs in FP8
    assert fp8.vision_bytes == bf16.vision_bytes  # vision_model is not converted
    assert not bf16.fits and fp8.fits
    assert main(["plan", "--model", str(tmp_path), "--gpus", "8", "--gpu-memory", "80"]) == 0
    assert "routed experts fp8" in capsys.readouterr().out
    with pytest.raises(ValueError, match="served in FP8"):
        plan_of(tmp_path, fp8_checkpoint=read_fp8_config(tmp_path), expert_quantization="int4")


def test_kv_cache_bytes_too_small_for_the_engine(scout):
    plan = plan_of(scout, kv_cache_bytes=2**20)  # 1 MiB: less than one 8192-token chunk of the chunked layers
    assert not plan.fits and plan.kv_tokens_per_replica == 0
    assert len(plan.warnings) == 1 and "engine.kv_cache_bytes (0.0 GiB) is less than" in plan.warnings[0]


def test_herd_up_refuses_what_does_not_fit_the_gpus(scout, maverick):
    """`herd up` checks GPU memory with the same arithmetic (cluster/launcher.py: check_gpu_memory)."""
    from cluster.launcher import ClusterError, check_gpu_memory

    sharded = {"mode": "sharded", "num_shards": 11, "num_gpus_per_shard": 1}
    engine = {"kv_cache_bytes": 8 * 2**30}
    cfg = HerdConfig.model_validate({"model": str(maverick), "experts": sharded, "engine": engine})
    refused = r"does not fit: .*`herd plan --model .* --gpus 8 --gpu-memory 80`"
    with pytest.raises(ClusterError, match=refused):
        check_gpu_memory(cfg, 8, 80 * 2**30)
    check_gpu_memory(cfg, 16, 80 * 2**30)  # fits: no error
    scout_cfg = HerdConfig.model_validate({"model": str(scout), "engine": engine})
    with pytest.raises(ClusterError, match="does not fit"):
        check_gpu_memory(scout_cfg, 1, 80 * 2**30)  # 200 GiB of bf16 experts colocated on one GPU
    int4 = HerdConfig.model_validate({"model": str(scout), "engine": {"kv_cache_bytes": 2 * 2**30},
                                      "experts": {"quantization": "int4"}})
    check_gpu_memory(int4, 1, 80 * 2**30)  # int4 experts (~50 GiB with scales): Scout on one 80 GiB GPU
