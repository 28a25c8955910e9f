"""Sampler, stop conditions and sampling parameters."""

import pytest
import torch

from deployments.engine.params import SamplingParams
from deployments.engine.sampler import Sampler, truncate
from deployments.engine.stop import FinishReason, StopChecker
from model.errors import InvalidInputError

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])


def draw(params: SamplingParams, n: int, seed: int = 0, logits=LOGITS) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = logits.expand(n, -1).contiguous()
    return Sampler().sample(rows, [params] * n, [g] * n).token_ids


def test_greedy_and_its_limits():
    assert draw(SamplingParams(temperature=0), 3).tolist() == [0, 0, 0]
    for p in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)):
        assert set(draw(p, 200).tolist()) == {0}


def test_frequencies_match_softmax():
    n = 20000
    counts = torch.bincount(draw(SamplingParams(temperature=1.0), n), minlength=5).float()
    p = torch.softmax(LOGITS[0], -1)
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() < 4 * sigma).all(), (counts, n * p)


def test_top_k_and_top_p_keep_the_right_sets():
    k2 = draw(SamplingParams(top_k=2), 4000)
    assert set(k2.tolist()) == {0, 1}
    p = torch.softmax(LOGITS[0], -1)
    ratio = (k2 == 0).sum() / (k2 == 1).sum()
    assert abs(ratio.item() - (p[0] / p[1]).item()) < 0.3
    # probs ~ [.61 .22 .14 .08 .03]: 0.7 of the mass needs the first two tokens
    assert set(draw(SamplingParams(top_p=0.7), 4000).tolist()) == {0, 1}
    kept = truncate(p[None], [SamplingParams(min_p=0.3)])
    assert (kept[0] > 0).tolist() == [True, True, False, False, False]


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(9, 50, generator=torch.Generator().manual_seed(1))
    seeded = SamplingParams(temperature=1.0, seed=7)
    alone = [Sampler().sample(logits[4:5], [seeded], [torch.Generator().manual_seed(7)]).token_ids.item()
             for _ in range(3)]
    others = [SamplingParams(temperature=0.5, top_k=3)] * 9
    params = others[:4] + [seeded] + others[5:]
    gens = [None] * 4 + [torch.Generator().manual_seed(7)] + [None] * 4
    batch = Sampler().sample(logits, params, gens).token_ids[4].item()
    assert alone == [batch] * 3


def test_logprobs_are_of_the_raw_distribution():
    res = Sampler().sample(LOGITS, [SamplingParams(temperature=0.5, logprobs=True)], [torch.Generator()])
    assert torch.allclose(res.logprobs, torch.log_softmax(LOGITS, -1)[0, res.token_ids])


def test_stop_conditions():
    params = SamplingParams(max_tokens=5, stop=["END"], stop_token_ids=[7])
    check = StopChecker(params, eos_token_ids=(2,))
    assert check.check(2, "a", 1).reason is FinishReason.STOP
    assert check.check(7, "a", 1).reason is FinishReason.STOP
    assert check.check(3, "abc", 5).reason is FinishReason.LENGTH
    span = StopChecker(params, (2,))
    assert span.check(3, "xyE", 1) is None
    assert span.holdback("xyE") == 1 and span.holdback("xyEN") == 2 and span.holdback("xyz") == 0
    result = span.check(4, "xyENDzz", 2)
    assert result.reason is FinishReason.STOP and result.truncate_to == 2
    ignore = StopChecker(SamplingParams(ignore_eos=True, stop_token_ids=[7]), (2,))
    assert ignore.check(2, "", 1) is None and ignore.check(7, "", 1) is not None


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": -1}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"bogus": 1}, "bogus"), ({"stop": ["x"] * 17}, "stop"), ({"stop": [""]}, "stop"),
    ({"seed": -3}, "seed"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidInputError, match=field):
        SamplingParams.create(**kwargs)


def test_top_k_minus_one_means_off():
    assert SamplingParams.create(top_k=-1).top_k == 0
