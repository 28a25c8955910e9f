"""The compiled step (deployments/engine/compile.py) on the CPU: `EngineConfig.compile` gives the
same greedy tokens and logprobs as the eager step; the padding that gives CUDA graphs static
shapes (dummy sequences writing into a scratch block) changes no real row; the settings refuse
what cannot work (CUDA graphs without CUDA or without compile)."""

import random

import pytest
import torch

from deployments.engine.compile import CompileSettings, StepCompiler, bucket_for, decode_buckets, experts_trace
from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.experts import UnframedBackend
from deployments.engine.params import SamplingParams
from deployments.engine.runner import ModelRunner
from model.checkpoint import load
from model.errors import ConfigError
from model.tokenizer import Tokenizer

STEPS = dict(block_size=4, max_num_batched_tokens=24, max_num_seqs=8)


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(3, 40))] for _ in range(count)]


def run(engine: Engine, batch: list[list[int]], n: int = 12) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens and their logprobs; the batch mixes prefill chunks with decode rows (24-token steps)."""
    done = engine.generate(batch, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=True))
    return [c.token_ids for c in done], torch.tensor([c.logprobs for c in done])


def whole_step_compiler(engine: Engine) -> StepCompiler:
    """A whole-step compiler for `engine`'s KV groups that dynamo traces without codegen (backend
    eager), attention and experts traceable: the path flex + grouped experts take."""
    return StepCompiler(CompileSettings(True, False, backend="eager"), engine.kv, 8,
                        attention_traceable=True, experts_traceable=True)


def use_compiler(engine: Engine, compiler: StepCompiler) -> None:
    """Run `engine`'s steps through `compiler` (a new runner over the same model, KV cache and backends)."""
    r = engine.runner
    engine.runner = ModelRunner(r.model, r.kv, r.cache, r.experts, r.attention, compiler)


def test_buckets():
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert decode_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert decode_buckets(1) == (1,)
    assert bucket_for(5, (1, 2, 4, 8)) == 8 and bucket_for(9, (1, 2, 4, 8)) is None


def test_settings_resolve_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert CompileSettings.resolve(None, None, cpu) == CompileSettings(False, False)
    assert CompileSettings.resolve(None, None, cuda) == CompileSettings(True, True)
    assert CompileSettings.resolve(True, None, cpu) == CompileSettings(True, False)
    assert CompileSettings.resolve(True, False, cuda) == CompileSettings(True, False)


def test_cuda_graphs_refused_on_the_cpu(scout_ckpt):
    _, path = scout_ckpt
    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA device"):
        Engine.from_pretrained(path, EngineConfig(compile=True, cuda_graphs=True))


def test_compiled_blocks_match_eager(scout_ckpt):
    """torch.compile (inductor, CPU) of every decoder block, attention and experts left eager."""
    _, path = scout_ckpt
    batch = prompts(3, seed=3)
    eager_tokens, eager_lp = run(Engine.from_pretrained(path, EngineConfig(**STEPS)), batch)
    engine = Engine.from_pretrained(path, EngineConfig(**STEPS, compile=True))
    assert engine.runner.compiler is not None and not engine.runner.compiler.step_traceable
    tokens, lp = run(engine, batch)
    assert tokens == eager_tokens
    torch.testing.assert_close(lp, eager_lp, atol=1e-4, rtol=0)


def test_padding_to_buckets_changes_no_real_row(scout_ckpt):
    """The whole-step path (as flex + grouped experts take it) traced by dynamo without codegen:
    decode batches padded to 1/2/4/8 rows and prefill to token buckets give the eager tokens."""
    _, path = scout_ckpt
    batch = prompts(5, seed=4)
    eager = Engine.from_pretrained(path, EngineConfig(**STEPS))
    eager_tokens, eager_lp = run(eager, batch)
    engine = Engine.from_pretrained(path, EngineConfig(**STEPS))
    compiler = whole_step_compiler(engine)
    use_compiler(engine, compiler)
    padded = []
    pad = compiler.pad
    compiler.pad = lambda chunks, **kw: padded.append(pad(chunks, **kw)) or padded[-1]  # type: ignore[method-assign]
    tokens, lp = run(engine, batch)
    assert tokens == eager_tokens
    torch.testing.assert_close(lp, eager_lp, atol=1e-5, rtol=0)
    sizes = {len(chunks) for chunks, decode_only in padded if decode_only}
    assert sizes <= {1, 2, 4, 8} and len(sizes) > 1  # decode batches shrank as requests finished
    assert any(c.seq.request_id == "padding" for chunks, _ in padded for c in chunks)
    # padding rows are not counted as expert load: the counters equal the eager engine's
    torch.testing.assert_close(engine.runner.expert_tokens, eager.runner.expert_tokens)


def test_experts_run_elsewhere_never_trace_the_whole_step(scout_ckpt):
    """flex + grouped in bf16 trace whole with the model's own experts; with experts that run
    elsewhere (Ray calls, the expert group's exchanges) the step is compiled per block instead."""
    _, path = scout_ckpt

    class Elsewhere(UnframedBackend):
        def run(self, layer, x, expert_ids, scores):
            raise AssertionError("not called: nothing is stepped")

    cfg = EngineConfig(**STEPS, compile=True, attention_backend="flex", expert_kernel="grouped")
    tok = Tokenizer.from_dir(path)
    colocated = Engine(load(path, dtype=torch.bfloat16), tok, cfg)
    assert colocated.runner.compiler is not None and colocated.runner.compiler.step_traceable
    remote = Engine(load(path, dtype=torch.bfloat16, experts=range(0, 0)), tok, cfg, experts=Elsewhere())
    assert remote.runner.compiler is not None and not remote.runner.compiler.step_traceable


def test_fp32_fast_path_traces_whole_with_the_grouped_experts_op(scout_ckpt, monkeypatch):
    """flex + grouped in fp32: `_grouped_mm` has no fp32 meta kernel, so under compile the experts
    are the opaque op `herd::grouped_experts` and the step still traces whole (dynamo, no codegen):
    no graph break, the op in the graph of steps over `PER_ROW_MAX_ROWS` rows (here 1: decode
    buckets of 2 and 4), the traced per-row form in the others, and the eager engine's tokens and
    logprobs."""
    from torch._dynamo.utils import counters

    from model import expert_kernel

    monkeypatch.setattr(expert_kernel, "PER_ROW_MAX_ROWS", 1)

    _, path = scout_ckpt
    batch = prompts(3, seed=5)
    fast = dict(STEPS, attention_backend="flex", expert_kernel="grouped")
    eager_tokens, eager_lp = run(Engine.from_pretrained(path, EngineConfig(**fast)), batch)
    engine = Engine.from_pretrained(path, EngineConfig(**fast))
    assert experts_trace("grouped", torch.float32)
    compiler = whole_step_compiler(engine)
    graphs: list[torch.fx.GraphModule] = []
    compiler._decode_compile = compiler._prefill_compile = lambda fn: torch.compile(  # type: ignore[method-assign]
        fn, backend=lambda gm, _: graphs.append(gm) or gm, dynamic=False)
    use_compiler(engine, compiler)
    counters.clear()
    tokens, lp = run(engine, batch)
    assert tokens == eager_tokens
    torch.testing.assert_close(lp, eager_lp, atol=1e-5, rtol=0)
    assert not counters["graph_break"]
    with_op = ["herd.grouped_experts" in str(g.graph) for g in graphs]
    assert any(with_op) and not all(with_op), with_op


def test_cpu_eager_prefill_is_not_padded(scout_ckpt):
    """On the CPU the whole-step compile runs prefill steps eager over gathered windows: they are not
    padded to the compiled prefill's token buckets (a dummy chunk would add up to as many tokens
    again); decode-only steps run as one of their buckets."""
    _, path = scout_ckpt
    fast = dict(STEPS, attention_backend="flex", expert_kernel="grouped")
    engine = Engine.from_pretrained(path, EngineConfig(**fast))
    compiler = whole_step_compiler(engine)
    use_compiler(engine, compiler)
    padded: list[tuple[int, int, bool]] = []  # (real tokens, tokens run, decode-only)
    pad = compiler.pad

    def recording(chunks, pad_prefill=True):
        run, decode_only = pad(chunks, pad_prefill)
        padded.append((sum(c.num_tokens for c in chunks), sum(c.num_tokens for c in run), decode_only))
        return run, decode_only

    compiler.pad = recording  # type: ignore[method-assign]
    run(engine, prompts(3, seed=11), n=3)
    assert any(not d for *_, d in padded) and all(real == ran for real, ran, d in padded if not d), padded
    assert all(ran in compiler.decode_buckets for _, ran, d in padded if d), padded


def test_compiled_cpu_engine_stores_routed_experts_column_major(scout_ckpt):
    """The whole-step compile on the CPU stores each expert's matrices column-major (the layout the
    compiled per-row experts read fastest): the same values; eager engines keep the checkpoint's."""
    from model.moe import Experts

    _, path = scout_ckpt
    fast = dict(STEPS, attention_backend="flex", expert_kernel="grouped")
    eager = Engine.from_pretrained(path, EngineConfig(**fast))
    compiled = Engine.from_pretrained(path, EngineConfig(**fast, compile=True))
    pairs = [(a, b) for a, b in zip(eager.model.modules(), compiled.model.modules(), strict=True)
             if isinstance(a, Experts)]
    assert pairs
    for a, b in pairs:
        for name in ("gate_up_proj", "down_proj"):
            w, cm = getattr(a, name), getattr(b, name)
            assert w.is_contiguous() and not cm.is_contiguous() and cm.transpose(1, 2).is_contiguous()
            assert torch.equal(w, cm)
