"""Quantized experts on the CPU (model/quantization.py, the reference expert kernel).

- Meta's FP8 layout: what `herd synth --quantize fp8` writes is what transformers' own fbgemm FP8
  integration makes of the same bf16 weights (its `FbgemmFp8Quantize.convert`, run here with its
  fbgemm quantizer swapped for our reference one: fbgemm_gpu is CUDA-only, and transformers'
  `FbgemmFp8HfQuantizer.validate_environment` refuses to load without a GPU, so transformers cannot
  run the FP8 model on the CPU). The loaded FP8 model is then compared with a dequantized copy of the
  same weights (fp32 checkpoint, no quantization_config) through our reference path: identical with
  the activation quantization turned off, close with it on.
- On-the-fly FP8 and int4 vs the unquantized model on tiny Scout- and Maverick-like checkpoints:
  max logit difference and greedy top-1 agreement at 256 positions (printed; see the thresholds'
  comments for what these random weights allow).
- Expert memory after load, scales included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import model.quantization as quantization
from model.checkpoint import load, load_expert_shard, tensor_files
from model.errors import CheckpointError, ConfigError
from model.expert_kernel import expert_kernel, fp8_per_expert, reference_kernel
from model.moe import Experts
from model.quantization import (
    FP8,
    Fp8ExpertWeights,
    Fp8Linear,
    Int4ExpertWeights,
    fp8_quantize_rows,
    module_bytes,
    should_convert,
)
from model.synth import FP8_MODULES_TO_NOT_CONVERT, synthesize
from model.tokenizer import Tokenizer


def expert_bytes(m: torch.nn.Module) -> int:
    return sum(module_bytes(x) for x in m.modules() if isinstance(x, Experts))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """tiny-maverick (dense + MoE layers) in bf16 and in Meta's FP8 layout, same seed."""
    root = tmp_path_factory.mktemp("quant")
    synthesize(root / "bf16", "tiny-maverick", seed=3, progress=False)
    synthesize(root / "fp8", "tiny-maverick", seed=3, progress=False, quantize="fp8")
    return root


def read_all(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in set(tensor_files(path).values()):
        out.update(load_file(str(file)))
    return out


# ---- the FP8 format ------------------------------------------------------------------------------
def test_fp8_row_quantizer_is_fbgemms_reference():
    """fbgemm's reference: inverse scale 448 / row max (capped at 448 * 512), x * it cast to e4m3,
    returned with its reciprocal; activations clamp the row max to scale_ub."""
    x = torch.randn(5, 64) * torch.tensor([1.0, 1e-3, 1e3, 0.0, 5e3])[:, None]
    q, scale = fp8_quantize_rows(x)
    inv = (448.0 / x.abs().amax(-1)).clamp(max=448.0 * 512)
    assert torch.equal(scale, 1 / inv) and torch.equal(q, (x * inv[:, None]).to(FP8)) and q.dtype == FP8
    assert torch.equal(q[3].float(), torch.zeros(64))  # an all-zero row stays zero
    rel = ((q.float() * scale[:, None] - x).abs() / x.abs().amax(-1, keepdim=True).clamp(min=1e-30))
    assert rel.max() <= 2**-4 * 1.01  # e4m3: 3 mantissa bits
    _, capped = fp8_quantize_rows(x, scale_ub=1200.0)
    assert capped[4] == capped[2] == pytest.approx(1200.0 / 448.0) and capped[0] == scale[0]


def test_synth_fp8_layout_is_transformers_fbgemm_layout(ckpts, monkeypatch):
    """Names, shapes, dtypes and values of the FP8 tensors equal transformers' FbgemmFp8Quantize output."""
    import transformers.integrations.fbgemm_fp8 as hf_fp8
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig

    monkeypatch.setattr(hf_fp8, "quantize_fp8_per_row", lambda x, *a, **k: fp8_quantize_rows(x), raising=False)
    bf16, fp8 = read_all(ckpts / "bf16"), read_all(ckpts / "fp8")
    cfg = json.loads((ckpts / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                          "modules_to_not_convert": FP8_MODULES_TO_NOT_CONVERT}
    t = cfg["text_config"]
    holder = torch.nn.Module()
    holder.experts = hf_fp8.FbgemmFp8Llama4TextExperts(Llama4TextConfig(
        hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_local_experts=t["num_local_experts"]))
    holder.linear = hf_fp8.FbgemmFp8Linear(t["hidden_size"], t["intermediate_size_mlp"], False)
    convert = hf_fp8.FbgemmFp8Quantize(None).convert
    converted = 0
    for name, dense in bf16.items():
        module, _, leaf = name.rpartition(".")
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            want = convert({f"experts.{leaf}": [dense]}, model=holder)
            want = {name + k.removeprefix(f"experts.{leaf}"): v for k, v in want.items()}
            hf_shape = getattr(holder.experts, leaf + "_scale").shape
            assert want[name + "_scale"].shape == hf_shape  # the module transformers loads them into
        elif leaf == "weight" and should_convert(module, FP8_MODULES_TO_NOT_CONVERT) and "norm" not in module \
                and not module.endswith("embed_tokens"):
            want = {name.replace("weight", k.removeprefix("linear."), 1) if k != "linear.weight" else name: v
                    for k, v in convert({"linear.weight": [dense]}, model=holder).items()}
        else:
            assert fp8[name].dtype == torch.bfloat16 and torch.equal(fp8[name], dense)
            continue
        assert set(want) == {n for n in fp8 if n == name or n == name + "_scale" or n == f"{module}.weight_scale"}
        for k, v in want.items():
            assert fp8[k].dtype == v.dtype and fp8[k].shape == v.shape and torch.equal(fp8[k].float(), v.float()), k
        converted += 1
    layers = t["num_hidden_layers"]
    assert converted == layers * 3 + len(t["moe_layers"]) * 2  # MLP or shared expert (3 Linears) + experts
    assert not any("self_attn" in n or "router" in n or "vision" in n for n in fp8 if n.endswith("_scale"))


def test_should_convert_matches_transformers():
    from transformers.quantizers.quantizers_utils import should_convert_module

    names = ["language_model.model.layers.1.self_attn.q_proj", "language_model.model.layers.11.feed_forward.router",
             "language_model.model.layers.1.feed_forward.experts", "language_model.lm_head",
             "vision_model.model.layers.0.mlp.fc1", "language_model.model.layers.0.feed_forward.gate_proj"]
    for patterns in (FP8_MODULES_TO_NOT_CONVERT, ["layers.1"], ["gate_proj", "lm_head"], None):
        assert [should_convert(n, patterns) for n in names] == [should_convert_module(n, patterns) for n in names]


def dequantized_copy(src: Path, dst: Path) -> None:
    """The FP8 checkpoint at `src` with every FP8 tensor replaced by weight * scale in fp32 (no quantization_config)."""
    tensors = read_all(src)
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale"):
            continue
        scale = tensors.get(name + "_scale", tensors.get(name.removesuffix("weight") + "weight_scale"))
        if name.endswith("experts.down_proj"):
            scale = scale.transpose(1, 2)  # [E, hidden, 1]: one per output column of [E, inter, hidden]
        out[name] = t.float() * scale if t.dtype == FP8 else t.float()  # [E, 1, N] or [out, 1] broadcast
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(out, str(dst / "model.safetensors"))


def test_fp8_checkpoint_equals_its_dequantized_copy(ckpts, tmp_path, monkeypatch):
    dequantized_copy(ckpts / "fp8", tmp_path / "deq")
    fp8_model, ref_model = load(ckpts / "fp8"), load(tmp_path / "deq")
    layer0, layer1 = fp8_model.language_model.model.layers[:2]
    assert isinstance(layer0.feed_forward.gate_proj, Fp8Linear)  # dense MLP
    assert isinstance(layer1.feed_forward.shared_expert.up_proj, Fp8Linear)
    assert isinstance(layer1.feed_forward.experts.gate_up_proj, Fp8ExpertWeights)
    assert layer1.self_attn.qkv_proj.dtype == torch.float32  # not converted: read in the model dtype
    ids = torch.randint(0, 200, (48,), generator=torch.Generator().manual_seed(0))
    ref = ref_model.logits(ids)
    with monkeypatch.context() as m:  # no activation quantization: the same weights, the same logits
        m.setattr(quantization, "fp8_fake_quantize_rows", lambda x, ub: x.float())
        torch.testing.assert_close(fp8_model.logits(ids), ref, rtol=1e-4, atol=1e-4)
    got = fp8_model.logits(ids)  # activations per token in FP8 as well
    diff, agree = (got - ref).abs().max().item(), (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"\nFP8 checkpoint vs its dequantized copy: max |logit diff| {diff:.3f}, top-1 agreement {agree:.3f}")
    assert 0 < diff < 4.0 and agree >= 0.85


def test_fp8_checkpoint_errors(ckpts, tmp_path):
    with pytest.raises(ConfigError, match="served in FP8"):
        load(ckpts / "fp8", quantization="int4")
    assert isinstance(load(ckpts / "fp8", quantization="none").language_model.model.layers[1].feed_forward
                      .experts.down_proj, Fp8ExpertWeights)  # FP8 whatever is asked
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (ckpts / "fp8").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = read_all(bad)
    del tensors["language_model.model.layers.1.feed_forward.experts.down_proj_scale"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="down_proj_scale' is missing"):
        load(bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'gptq' is not supported"):
        load(bad)
    with pytest.raises(ConfigError, match="unknown expert quantization 'int8'"):
        load(ckpts / "bf16", quantization="int8")


def test_fp8_expert_shard_reads_its_slice(ckpts):
    full = load(ckpts / "fp8").language_model.model.layers[1].feed_forward.experts
    shard = load_expert_shard(ckpts / "fp8", range(2, 5))[1]
    assert torch.equal(shard.gate_up_proj.weight.float(), full.gate_up_proj.weight[2:5].float())
    assert torch.equal(shard.down_proj.scale, full.down_proj.scale[2:5])


# ---- kernels -------------------------------------------------------------------------------------
def test_int4_layout_is_tinygemms():
    """Our nibbles and bf16 scales, given to PyTorch's tinygemm int4 kernel (its CPU build: the CUDA
    one takes the same values packed two per byte), give what `dequantize` gives."""
    w = torch.randn(2, 128, 48)
    q = Int4ExpertWeights.quantize(w)
    assert q.group_size == 128 and q.packed.shape == (2, 48, 64) and q.scale.dtype == torch.bfloat16
    x = torch.randn(5, 128).to(torch.bfloat16)
    for e in range(2):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.nibbles(e).to(torch.int32), 2)
        sz = torch.stack([q.scale[e], torch.zeros_like(q.scale[e])], dim=-1)
        got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, q.group_size, sz)
        torch.testing.assert_close(got.float(), x.float() @ q.dequantize(e), rtol=2e-2, atol=5e-2)
    assert (q.dequantize(0) - w[0]).abs().max() <= q.scale[0].float().max() / 2 * 1.01  # half a step


def test_fp8_scaled_mm_path_equals_reference():
    """The CUDA path's per-expert torch._scaled_mm (row-wise scales, our transposed FP8 layout) equals
    the reference dequantize-then-matmul, where this torch runs _scaled_mm on the CPU."""
    w = Fp8ExpertWeights.quantize(torch.randn(3, 64, 32) / 8)
    x, counts = torch.randn(10, 64), torch.tensor([4, 0, 6])
    try:
        got = fp8_per_expert(x, counts, w)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch has no CPU _scaled_mm: {e}")  # torch 2.11; the GPU check runs it
    ref = torch.cat([quantization.expert_matmul(r, w, e) for e, r in enumerate(x.split([4, 0, 6])) if r.numel()])
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


def test_quantized_kernel_is_the_reference_off_cuda():
    w1, w2 = Int4ExpertWeights.quantize(torch.randn(2, 64, 64)), Int4ExpertWeights.quantize(torch.randn(2, 32, 64))
    x, counts = torch.randn(6, 64), torch.tensor([2, 4])
    assert torch.equal(expert_kernel("quantized")(x, counts, w1, w2), reference_kernel(x, counts, w1, w2))


# ---- on-the-fly quantization ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for preset in ("tiny-scout", "tiny-maverick"):
        synthesize(root / preset, preset, seed=0, progress=False)
    return root


# Targets of the issue: FP8 >= 99%, int4 >= 97%. Not reachable on these tiny random models: their
# top-1 margins are small (median ~0.2 logits) and they are chaotic enough that bf16 vs fp32 alone
# agrees on only ~96-98% of positions. The thresholds below sit under what was measured (printed).
AGREEMENT = {"fp8": 0.85, "int4": 0.70}


@pytest.mark.parametrize("preset", ["tiny-scout", "tiny-maverick"])
def test_on_the_fly_quantization_vs_unquantized(tiny, preset):
    """Teacher-forced on one 264-token text sequence: at each of the last 256 positions, does the
    quantized model's greedy (argmax) token equal the unquantized one's? (Generating the sequence
    greedily first costs minutes on the CI's 2 cores for the same measure.)"""
    path = tiny / preset
    ref = load(path)
    seq = torch.randint(10, 2000, (264,), generator=torch.Generator().manual_seed(0))
    seq[0] = Tokenizer.from_dir(path).bos_id
    positions = slice(8, 264)
    want = ref.logits(seq)[positions]
    bf16 = load(path, dtype=torch.bfloat16).logits(seq)[positions]
    lines = [f"\n{preset}, 256 positions: bf16 vs fp32 top-1 agreement "
             f"{(bf16.argmax(-1) == want.argmax(-1)).float().mean():.3f}"]
    for mode in ("fp8", "int4"):
        got = load(path, quantization=mode).logits(seq)[positions]
        diff, agree = (got - want).abs().max().item(), (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        lines.append(f"{mode}: max |logit diff| {diff:.3f} (logit std {want.std():.3f}), top-1 agreement {agree:.3f}")
        assert 0 < diff < 4.0 and agree >= AGREEMENT[mode]
    print("\n".join(lines))


def test_expert_memory_after_load(tmp_path):
    """On small-scout's expert shapes (hidden 256, intermediate 256; the tiny presets' 32-64 wide
    experts carry relatively more scale bytes): FP8 <= 0.52x, int4 <= 0.3x of the bf16 bytes, scales included."""
    synthesize(tmp_path, "small-scout", seed=0, num_layers=2, progress=False)
    bf16 = expert_bytes(load(tmp_path, dtype=torch.bfloat16))
    fp8 = expert_bytes(load(tmp_path, dtype=torch.bfloat16, quantization="fp8"))
    int4 = expert_bytes(load(tmp_path, dtype=torch.bfloat16, quantization="int4"))
    print(f"\nsmall-scout experts (2 MoE layers): bf16 {bf16} B, fp8 {fp8} B ({fp8 / bf16:.3f}x), "
          f"int4 {int4} B ({int4 / bf16:.3f}x)")
    assert bf16 == 2 * 16 * (256 * 512 + 256 * 256) * 2
    assert fp8 / bf16 <= 0.52 and int4 / bf16 <= 0.3
    shard = load_expert_shard(tmp_path, range(4, 12), quantization="int4")  # a shard quantizes its slice only
    assert sum(module_bytes(m) for m in shard.values()) == int4 // 2


def test_fingerprint_names_the_expert_quantization(ckpts):
    """The shared KV cache keys entries by the model fingerprint: quantized experts change the KV."""
    from model.checkpoint import fingerprint

    plain = fingerprint(ckpts / "bf16")
    assert fingerprint(ckpts / "bf16", quantization="none") == plain
    assert len({plain, fingerprint(ckpts / "bf16", quantization="fp8"),
                fingerprint(ckpts / "bf16", quantization="int4")}) == 3
