"""Greedy generation of the engine equals transformers' `generate`, token for token: one request
(and its logits, step by step), 16 concurrent requests joining and leaving at different steps with
prompts split by chunked prefill, image prompts, and across preemption; and its logits equal
transformers' over 40 decode steps of a batch mixing prefill chunks and decode rows. Every test
runs on each engine path: attention backend (`reference`, `flex`) x expert kernel (`reference`,
`grouped`); flex + grouped is the fast path (`flex` compiles once per model: every step here fits
the 16-token bucket)."""

import random

import pytest
import torch
from PIL import Image

from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.inputs import prepare_prompt
from deployments.engine.params import SamplingParams
from tests.conftest import reference_logits
from tests.deployments.engine.conftest import hf_greedy

# Both KV groups get 512 blocks: caches of one shape, so `flex` compiles once for every test here
# and in test_engine_behaviour / test_flex_attention (the tiny presets share their attention shape).
SMALL_STEPS = EngineConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=16, num_blocks_full=512,
                           num_blocks_chunked=512)
PATHS = pytest.mark.parametrize("backend,kernel", [("reference", "reference"), ("flex", "reference"),
                                                   ("reference", "grouped"), ("flex", "grouped")])
LOGITS_TOL = 1e-4


def small_steps(backend: str, kernel: str, **update) -> EngineConfig:
    return SMALL_STEPS.model_copy(update={"attention_backend": backend, "expert_kernel": kernel, **update})


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(3, 60))] for _ in range(count)]


@PATHS
@pytest.mark.parametrize("ckpt", ["scout_ckpt", "maverick_ckpt"])
def test_single_request(request, ckpt, backend, kernel):
    """32 decode steps past a chunked prefill: the same greedy tokens as transformers, and every
    step's logits within 1e-4 of transformers' on the same tokens."""
    ref, path = request.getfixturevalue(ckpt)
    engine = Engine.from_pretrained(path, small_steps(backend, kernel))
    steps: list[torch.Tensor] = []
    execute = engine.runner.execute
    engine.runner.execute = lambda chunks: steps.append(execute(chunks)) or steps[-1]  # type: ignore[method-assign]
    [ids] = prompts(1, seed=1)
    [out] = engine.generate([ids], greedy(33))
    assert out.token_ids == hf_greedy(ref, ids, 33)
    assert out.finish_reason == "length"
    ours = torch.cat([s for s in steps if len(s)])  # [33, V]: the prefill's last row, then each decode step
    with torch.no_grad():
        theirs = reference_logits(ref, torch.tensor(ids + out.token_ids[:-1]))[len(ids) - 1 :]
    assert ours.shape == theirs.shape == (33, ref.config.text_config.vocab_size)
    diff = (ours - theirs).abs().max().item()
    assert diff <= LOGITS_TOL, f"max abs logit diff {diff:.2e}"


def run_staggered(engine: Engine, batch: list[list[int]], lengths: list[int]) -> dict[str, list[int]]:
    """Half the requests join at once, the rest one per step while the first half decode."""
    got: dict[str, list[int]] = {}
    pending = list(enumerate(batch))
    for i, ids in pending[: len(batch) // 2]:
        engine.add_request(ids, greedy(lengths[i]), request_id=str(i))
    late = pending[len(batch) // 2 :]
    while engine.has_unfinished() or late:
        if late:
            i, ids = late.pop(0)
            engine.add_request(ids, greedy(lengths[i]), request_id=str(i))
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    return got


@PATHS
@pytest.mark.parametrize("ckpt", ["scout_ckpt", "maverick_ckpt"])
def test_sixteen_concurrent_requests(request, ckpt, backend, kernel):
    ref, path = request.getfixturevalue(ckpt)
    engine = Engine.from_pretrained(path, small_steps(backend, kernel))
    batch = prompts(16, seed=2)
    lengths = [random.Random(i).randrange(2, 20) for i in range(16)]
    got = run_staggered(engine, batch, lengths)
    for i, ids in enumerate(batch):
        assert got[str(i)] == hf_greedy(ref, ids, lengths[i]), f"request {i} ({len(ids)} prompt tokens)"
    assert all(pool.num_used == 0 for pool in engine.kv.pools.values())


@PATHS
def test_preemption_keeps_tokens_exact(scout_ckpt, backend, kernel):
    ref, path = scout_ckpt
    engine = Engine.from_pretrained(path, small_steps(backend, kernel, num_blocks_full=48, num_blocks_chunked=48,
                                                     enable_prefix_caching=False))
    batch = prompts(16, seed=3)
    lengths = [16] * 16
    got = run_staggered(engine, batch, lengths)
    assert engine.scheduler.num_preemptions > 0
    for i, ids in enumerate(batch):
        assert got[str(i)] == hf_greedy(ref, ids, 16), f"request {i}"
    assert all(pool.num_used == 0 for pool in engine.kv.pools.values())


@PATHS
@pytest.mark.parametrize("ckpt", ["scout_ckpt", "maverick_ckpt"])
def test_image_prompts(request, ckpt, backend, kernel):
    ref, path = request.getfixturevalue(ckpt)
    engine = Engine.from_pretrained(path, small_steps(backend, kernel))
    processor = engine.model.image_processor
    images = [Image.effect_noise((150, 60), 40).convert("RGB"), Image.effect_noise((30, 50), 60).convert("RGB")]
    image = engine.tokenizer.image_ids.image
    placeholders = [5, 6, image, 7, 8, image, 9]
    ids, inputs = prepare_prompt(engine.model, engine.tokenizer, placeholders, images, ["a", "b"])
    tiles = torch.cat([processor.preprocess(img).pixel_values for img in images])
    [out] = engine.generate([ids], greedy(12), images=[inputs])
    assert out.token_ids == hf_greedy(ref, ids, 12, tiles)


@PATHS
@pytest.mark.parametrize("ckpt", ["scout_ckpt", "maverick_ckpt"])
def test_logits_equal_transformers_over_40_decode_steps(request, ckpt, backend, kernel):
    """Four requests (prompts of 9-31 tokens, so every prefill crosses an 8-token attention chunk)
    join two steps apart: steps mix prefill chunks and decode rows. Every sampled row's logits
    equal transformers' forward over the same tokens, and greedy tokens equal its `generate`."""
    ref, path = request.getfixturevalue(ckpt)
    engine = Engine.from_pretrained(path, small_steps(backend, kernel))
    logits: dict[str, dict[int, torch.Tensor]] = {}  # request -> position of the sampled row -> logits
    execute = engine.runner.execute

    def recording(chunks):
        out = execute(chunks)
        for c, row in zip([c for c in chunks if c.samples], out, strict=True):
            logits.setdefault(c.seq.request_id, {})[c.start + c.num_tokens - 1] = row.clone()
        return out

    engine.runner.execute = recording
    batch = [[random.Random(i).randrange(3, 500) for _ in range(n)] for i, n in enumerate([9, 31, 17, 24])]
    got: dict[str, list[int]] = {}
    for i, ids in enumerate(batch):
        engine.add_request(ids, greedy(40), request_id=str(i))
        for _ in range(2):
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    for i, ids in enumerate(batch):
        assert got[str(i)] == hf_greedy(ref, ids, 40), f"request {i}"
        tokens = torch.tensor(ids + got[str(i)][:-1])[None]
        with torch.no_grad():
            want = ref.language_model(input_ids=tokens).logits[0]
        rows = logits[str(i)]
        assert sorted(rows) == list(range(len(ids) - 1, len(ids) + 39))
        for p, row in rows.items():
            err = (row - want[p]).abs().max().item()
            assert err <= 1e-4, f"request {i}, position {p}: logits differ by {err:.2e}"


def test_flex_runs_in_bf16(scout_ckpt):
    """bf16 on the CPU through the flex backend: the first step's logits (same inputs) stay close to
    the reference backend's in bf16, and generation runs to the end. (Greedy tokens of the tiny random
    model drift from fp32 after a few steps in bf16 on either backend: its logits are nearly flat.)"""
    _, path = scout_ckpt
    prompts_ = prompts(2, seed=4)
    first: dict[str, torch.Tensor] = {}
    for backend in ("reference", "flex"):
        engine = Engine.from_pretrained(path, small_steps(backend, "reference"), dtype=torch.bfloat16)
        execute = engine.runner.execute

        def recording(chunks, execute=execute, backend=backend):
            out = execute(chunks)
            if len(out):  # the first step that samples (the same chunks on both backends)
                first.setdefault(backend, out)
            return out

        engine.runner.execute = recording
        outs = engine.generate(prompts_, greedy(16))
        assert [len(o.token_ids) for o in outs] == [16, 16]
    assert first["flex"].dtype == torch.float32 and first["flex"].isfinite().all()
    err = (first["flex"] - first["reference"]).abs().max().item()
    print(f"bf16 first-step logits, flex vs reference: max abs diff {err:.3g}")
    assert err < 0.05 * first["reference"].abs().max().item()
