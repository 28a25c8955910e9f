"""Engine invariants: cancellation frees KV at once, prefix-cache hits give the tokens misses give
(and never cross tenants or images), admission limits, streaming deltas, seeds, stop strings."""

import json

import pytest

from cluster.cli import main
from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine, EngineOverloaded
from deployments.engine.params import SamplingParams
from deployments.engine.sequence import ImageInput
from model.errors import InvalidInputError

CFG = EngineConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=8)
LONG = [(7 * i) % 500 + 3 for i in range(50)]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def path(scout_ckpt):
    return scout_ckpt[1]


@pytest.fixture
def engine(path):
    return Engine.from_pretrained(path, CFG)


def used(engine) -> int:
    return sum(p.num_used for p in engine.kv.pools.values())


def test_cancellation_frees_blocks_at_once(engine):
    for i in range(4):
        engine.add_request(LONG[: 20 + i], greedy(30), request_id=f"r{i}")
    for _ in range(6):
        engine.step()
    before = used(engine)
    assert engine.abort("r1") and engine.abort("r3")
    assert 0 < used(engine) < before
    assert not engine.abort("r1")  # already gone
    while engine.has_unfinished():
        engine.step()
    assert used(engine) == 0


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_prefix_hits_give_the_same_tokens(path, backend):
    # one cache shape for both KV groups, the one `flex` compiled for the parity tests
    cfg = CFG.model_copy(update={"attention_backend": backend, "num_blocks_full": 512, "num_blocks_chunked": 512})
    cold = Engine.from_pretrained(path, cfg.model_copy(update={"enable_prefix_caching": False}))
    want = cold.generate([LONG + [9, 9]], greedy(12))[0]
    warm = Engine.from_pretrained(path, cfg)
    first = warm.generate([LONG + [1]], greedy(12))[0]
    second = warm.generate([LONG + [9, 9]], greedy(12))[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 48  # 12 full blocks of the shared 50-token prefix
    assert second.token_ids == want.token_ids
    assert used(warm) == 0


def test_tenants_never_share_cache_entries(engine):
    engine.add_request(LONG, greedy(2), cache_salt="tenant-a")
    while engine.has_unfinished():
        engine.step()
    engine.add_request(LONG, greedy(2), request_id="b", cache_salt="tenant-b")
    engine.add_request(LONG, greedy(2), request_id="a2", cache_salt="tenant-a")
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
    assert outs["b"].num_cached_tokens == 0 and outs["a2"].num_cached_tokens == 48


def test_a_different_image_is_a_miss(engine):
    patch = engine.model.cfg.image_token_index
    rows = engine.model.cfg.text.hidden_size
    import torch

    ids = LONG[:10] + [patch] * 8 + LONG[10:40]
    img = lambda d, s: [ImageInput(torch.randn(8, rows, generator=torch.Generator().manual_seed(s)), d)]  # noqa: E731
    a = engine.generate([ids], greedy(4), images=[img("x", 1)])[0]
    b = engine.generate([ids], greedy(4), images=[img("y", 2)])[0]
    c = engine.generate([ids], greedy(4), images=[img("x", 1)])[0]
    assert b.num_cached_tokens == 8  # only the blocks before the image
    assert c.num_cached_tokens == 44 and c.token_ids == a.token_ids


def test_admission_limits(path):
    # one running slot: requests beyond it wait, and beyond max_waiting of those they are refused
    engine = Engine.from_pretrained(path, CFG.model_copy(update={"max_waiting": 2, "max_model_len": 64,
                                                                 "max_num_seqs": 1}))
    with pytest.raises(InvalidInputError, match="too long"):
        engine.add_request(list(range(3, 70)), greedy(1))
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        engine.add_request([1, 10**6], greedy(1))
    with pytest.raises(InvalidInputError, match="<\\|patch\\|>"):
        engine.add_request([1, engine.model.cfg.image_token_index], greedy(1))
    engine.add_request([5, 6], greedy(1), request_id="x")
    with pytest.raises(InvalidInputError, match="already running"):
        engine.add_request([5, 6], greedy(1), request_id="x")
    engine.add_request([5, 6], greedy(1))
    engine.add_request([5, 6], greedy(1))  # 3 waiting, 1 of them takes the free slot at the next step
    with pytest.raises(EngineOverloaded, match="2 requests are already waiting"):
        engine.add_request([5, 6], greedy(1))


def test_context_limit_ends_with_length(path):
    engine = Engine.from_pretrained(path, CFG.model_copy(update={"max_model_len": 24}))
    out = engine.generate([LONG[:20]], greedy(100))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_stream_deltas_add_up_to_the_text(engine):
    out = engine.generate([LONG], SamplingParams(max_tokens=40, temperature=1.0, seed=1))[0]
    assert "".join(o.text for o in out.outputs) == out.text
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_stop_string_is_cut_and_never_streamed(engine):
    full = engine.generate([LONG], greedy(30))[0].text
    assert len(full) > 12
    stop = full[10:13]
    out = engine.generate([LONG], greedy(30, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]
    assert stop not in "".join(o.text for o in out.outputs)


def test_seed_reproducible_whatever_the_batch(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=42)
    alone = engine.generate([LONG], params)[0].token_ids
    crowd = engine.generate([LONG[:30], LONG, LONG[5:]], [SamplingParams(max_tokens=5, temperature=0.7), params,
                                                          SamplingParams(max_tokens=12, temperature=1.3, top_k=5)])
    assert crowd[1].token_ids == alone
    other = engine.generate([LONG], SamplingParams(max_tokens=12, temperature=1.0, seed=43))[0].token_ids
    assert other != alone


def test_logprobs_of_greedy_tokens(engine):
    out = engine.generate([LONG], greedy(5, logprobs=True))[0]
    assert len(out.logprobs) == 5 and all(lp <= 0 for lp in out.logprobs)


def test_cli_generate_offline_json(path, capsys):
    assert main(["generate", "--offline", "--model", str(path), "--prompt-ids", "5,6,7,8", "--max-tokens", "6",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    engine = Engine.from_pretrained(path)
    want = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert got["token_ids"] == want.token_ids and got["finish_reason"] == want.finish_reason
    assert got["text"] == want.text


def test_expert_load_counts_every_routed_token(engine):
    """The per-expert counter behind `herd_expert_routed_tokens`: every token that ran through a MoE
    layer counted top-k times, once per MoE layer."""
    text = engine.model.cfg.text
    other = [11 + i % 7 for i in range(20)]  # shares no prefix with LONG: no cache hits
    engine.generate([LONG, other], greedy(5))
    ran = (len(LONG) + 4) + (len(other) + 4)  # prompt + generated tokens fed back (the last one is not)
    moe_layers = sum(text.is_moe_layer(i) for i in range(text.num_hidden_layers))
    counts = engine.runner.expert_tokens
    assert counts.numel() == text.num_local_experts
    assert int(counts.sum()) == ran * moe_layers * text.num_experts_per_tok
