"""Structure of a decode step with the fast path's expert kernel, counted with torch.profiler on
the CPU: at most two expert GEMM calls per MoE layer whatever the number of experts hit, and no
op that would make the host wait for the device besides reading the sampled ids.

With the whole fast path (flex attention + grouped experts), one attention call per layer (one
compiled flex call) whatever the batch size, and the same ops for 1 or 12 sequences.
The CPU fallback of `aten::_grouped_mm` reads its offsets with `item()` inside the op: they are on
the host there; on a GPU the grouped kernel reads them on the device. Those nested reads are not
counted (`StepOps.syncs` counts ops called from Python)."""

import pytest

from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from deployments.engine.step_ops import StepOps, profile_step


def decode_step(path, kernel: str, batch: int, attention: str = "reference") -> tuple[StepOps, Engine]:
    """The ops of one decode step of `batch` sequences (every one past its prefill)."""
    engine = Engine.from_pretrained(path, EngineConfig(block_size=4, max_num_batched_tokens=256,
                                                       expert_kernel=kernel, attention_backend=attention))
    for i in range(batch):
        engine.add_request([5 + i, 60 + 7 * i, 7, 200 - i, 9, 11 * i + 3], SamplingParams(
            max_tokens=8, temperature=0.0, ignore_eos=True))
    engine.step()  # every prefill in one step
    engine.step()  # a first decode step (warm-up)
    assert all(s.num_computed >= 6 for s in engine.scheduler.running)
    return profile_step(engine), engine


@pytest.mark.parametrize("ckpt", ["scout_ckpt", "maverick_ckpt"])
def test_grouped_decode_step_has_two_expert_gemms_per_moe_layer_and_no_syncs(request, ckpt):
    _, path = request.getfixturevalue(ckpt)
    small, engine = decode_step(path, "grouped", batch=1)
    large, _ = decode_step(path, "grouped", batch=12)
    moe_layers = len(engine.model.cfg.text.moe_layers or [])
    assert moe_layers > 0
    for ops in (small, large):
        assert ops.top["aten::_grouped_mm"] == 2 * moe_layers
        assert ops.top["aten::matmul"] == ops.top["aten::mm"] == ops.top["aten::bmm"] == 0  # no per-expert loop
        assert ops.syncs == {"tolist": 1}  # the sampled ids, read by the engine
    assert small.gemms == large.gemms  # 1 or 12 sequences, however many experts they hit


def test_reference_kernel_is_what_the_counts_catch(scout_ckpt):
    """Guard against a vacuous pass: the reference kernel loops over experts and reads the counts."""
    _, path = scout_ckpt
    small, _ = decode_step(path, "reference", batch=1)
    large, _ = decode_step(path, "reference", batch=12)
    assert large.gemms > small.gemms  # more experts hit, more matmuls
    assert large.syncs["tolist"] > 1


@pytest.mark.parametrize("ckpt", ["scout_ckpt", "maverick_ckpt"])
def test_fast_path_decode_step_has_one_attention_call_per_layer(request, ckpt):
    """flex + grouped: per decode step one attention call per layer and two expert GEMMs per MoE
    layer, for 1 sequence as for 12, and no host sync besides the sampled ids."""
    _, path = request.getfixturevalue(ckpt)
    small, engine = decode_step(path, "grouped", batch=1, attention="flex")
    large, _ = decode_step(path, "grouped", batch=12, attention="flex")
    text = engine.model.cfg.text
    for ops in (small, large):
        assert ops.attention_calls == ops.compiled_regions == text.num_hidden_layers
        assert ops.top["aten::scaled_dot_product_attention"] == 0
        assert ops.top["aten::_grouped_mm"] == 2 * len(text.moe_layers or [])
        assert ops.syncs == {"tolist": 1}
    views = ("aten::view", "aten::reshape", "aten::_unsafe_view")  # metadata only (a reshape may view or not)
    compute = lambda ops: {k: n for k, n in ops.top.items() if k not in views}  # noqa: E731
    assert compute(small) == compute(large)  # the same ops, op for op, whatever the batch size


def test_reference_attention_is_what_the_counts_catch(scout_ckpt):
    """Guard: the reference backend makes one SDPA call per sequence and layer."""
    _, path = scout_ckpt
    small, engine = decode_step(path, "grouped", batch=1)
    large, _ = decode_step(path, "grouped", batch=12)
    layers = engine.model.cfg.text.num_hidden_layers
    assert (small.attention_calls, large.attention_calls) == (layers, 12 * layers)
