"""Sampler: greedy and its limits, per-request seeds, empirical frequencies, truncation sets, logprobs."""

import pytest
import torch

from deployments.engine.params import SamplingParams
from deployments.engine.sampler import Sampler, truncate

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])  # probs ~ [.563 .207 .126 .076 .028]
PROBS = torch.softmax(LOGITS, dim=-1)
CHI2_4DOF_P001 = 18.47  # chi-square critical value, 4 degrees of freedom, p = 0.001


def params(**kw) -> SamplingParams:
    return SamplingParams.create(**kw)


def draw(p: SamplingParams, n: int, seed: int = 0, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    """n independent draws [n] from one distribution: n identical rows sharing one generator."""
    g = torch.Generator().manual_seed(seed)
    rows = logits.expand(n, -1).contiguous()  # [n, V]
    return Sampler().sample(rows, [p] * n, [g] * n).token_ids


def random_logits(rows: int, vocab: int, seed: int, gap: float = 0.0) -> torch.Tensor:
    """Random logits [rows, vocab]; the top token leads the runner-up by at least `gap`."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    top = logits.argmax(dim=-1, keepdim=True)
    return logits.scatter_add(1, top, torch.full((rows, 1), gap))


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Per-bin within 3 sigma of the binomial expectation, and a chi-square test at p = 0.001."""
    n = counts.sum()
    expected = n * probs
    sigma = (n * probs * (1 - probs)).sqrt()
    assert ((counts - expected).abs() <= 3 * sigma).all(), (counts, expected)
    support = probs > 0
    chi2 = ((counts[support] - expected[support]) ** 2 / expected[support]).sum()
    assert chi2 < CHI2_4DOF_P001, chi2  # dof <= 4 here: the 4-dof bound is the loosest used


# ---- greedy and its limits -------------------------------------------------------------------

def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = random_logits(16, 100, seed=1)
    result = Sampler().sample(logits, [params(temperature=0)] * 16, [None] * 16)
    assert torch.equal(result.token_ids, logits.argmax(dim=-1))
    assert result.token_ids.dtype == torch.int64 and result.token_ids.shape == (16,) and result.logprobs is None
    tie = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert Sampler().sample(tie, [params(temperature=0)], [None]).token_ids.tolist() == [1]


@pytest.mark.parametrize("kw", [
    {"temperature": 1e-2}, {"temperature": 1e-4}, {"temperature": 1e-7},  # the last is below the greedy cut-off
    {"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}, {"temperature": 3.0, "top_k": 1},
])
def test_limits_of_sampling_equal_greedy(kw):
    logits = random_logits(64, 200, seed=2, gap=0.5)  # no near-ties: "ties aside"
    want = logits.argmax(dim=-1)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        got = Sampler().sample(logits, [params(**kw)] * 64, [g] * 64).token_ids
        assert torch.equal(got, want)


def test_greedy_rows_stay_greedy_in_a_mixed_batch():
    logits = random_logits(6, 50, seed=3)
    ps = [params(temperature=0), params(temperature=1.5), params(temperature=0, seed=4)] * 2
    gens = [None, None, torch.Generator().manual_seed(4)] * 2
    got = Sampler().sample(logits, ps, gens).token_ids
    assert torch.equal(got[[0, 2, 3, 5]], logits.argmax(dim=-1)[[0, 2, 3, 5]])


# ---- seeds -------------------------------------------------------------------------------------

SEEDED = params(temperature=1.0, top_p=0.95, seed=7)
NEIGHBOURS = [params(temperature=0), params(temperature=0.7, top_k=5), params(top_p=0.5),
              params(min_p=0.2, seed=11), params(temperature=1.3), params(temperature=0.9, seed=7, top_k=40),
              params(top_k=3, top_p=0.9, min_p=0.05), params(temperature=2.0, seed=1)]


def run_alone(steps: torch.Tensor, p: SamplingParams, seed: int) -> list[int]:
    """The request on its own: one row per step, its own generator across steps."""
    g = torch.Generator().manual_seed(seed)
    return [Sampler().sample(step[:1], [p], [g]).token_ids.item() for step in steps]


def test_same_seed_same_tokens_across_calls():
    steps = torch.randn(40, 1, 64, generator=torch.Generator().manual_seed(5))  # [steps, 1, V]
    first = run_alone(steps, SEEDED, 7)
    assert first == run_alone(steps, SEEDED, 7)
    assert len(set(first)) > 5  # really sampling, not stuck on one token


def test_seeded_row_does_not_depend_on_the_batch():
    steps = torch.randn(40, 9, 64, generator=torch.Generator().manual_seed(6))  # [steps, 9, V]
    alone = run_alone(steps, SEEDED, 7)
    g = torch.Generator().manual_seed(7)
    neighbour_gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in NEIGHBOURS]
    in_batch = []
    for t, step in enumerate(steps):
        at = t % 9  # the request moves around the batch from step to step
        ps = NEIGHBOURS[:at] + [SEEDED] + NEIGHBOURS[at:]
        gens = neighbour_gens[:at] + [g] + neighbour_gens[at:]
        logits = torch.cat([step[1:at + 1], step[:1], step[at + 1:]])  # the request's logits at row `at`
        in_batch.append(Sampler().sample(logits, ps, gens).token_ids[at].item())
    assert in_batch == alone


def test_different_seeds_give_different_sequences():
    steps = torch.randn(30, 1, 64, generator=torch.Generator().manual_seed(8))
    runs = {tuple(run_alone(steps, params(seed=s), s)) for s in range(6)}
    assert len(runs) == 6


def test_unseeded_rows_use_the_global_rng():
    logits = LOGITS.expand(100, -1).contiguous()
    with torch.random.fork_rng():
        torch.manual_seed(123)
        a = Sampler().sample(logits, [params()] * 100, [None] * 100).token_ids
        torch.manual_seed(123)
        b = Sampler().sample(logits, [params()] * 100, [None] * 100).token_ids
    assert torch.equal(a, b) and len(set(a.tolist())) > 1


# ---- frequencies ---------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_match_softmax(temperature):
    counts = torch.bincount(draw(params(temperature=temperature), 20000), minlength=5).double()
    assert_matches(counts, torch.softmax(LOGITS.double() / temperature, dim=-1))


def test_top_k_keeps_the_top_two_in_their_ratio():
    counts = torch.bincount(draw(params(top_k=2), 20000, seed=1), minlength=5).double()
    assert counts[2:].sum() == 0
    kept = PROBS.double() * torch.tensor([1, 1, 0, 0, 0])
    assert_matches(counts, kept / kept.sum())


@pytest.mark.parametrize("top_p, nucleus", [(0.5, 1), (0.7, 2), (0.8, 3), (0.95, 4), (1.0, 5)])
def test_top_p_keeps_the_right_nucleus(top_p, nucleus):
    # cumulative probs ~ [.563 .770 .896 .972 1.0]: the smallest prefix reaching top_p
    counts = torch.bincount(draw(params(top_p=top_p), 20000, seed=2), minlength=5).double()
    assert (counts[:nucleus] > 0).all() and counts[nucleus:].sum() == 0
    kept = PROBS.double() * (torch.arange(5) < nucleus)
    assert_matches(counts, kept / kept.sum())


def test_top_p_applies_to_what_top_k_left():
    # top_k=2 renormalises to [.731 .269]: 0.7 of that mass is the top token alone (HF / vLLM order)
    assert set(draw(params(top_k=2, top_p=0.7), 2000).tolist()) == {0}


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    kept = truncate(PROBS[None], [params(min_p=0.3)])  # threshold .3 * .563 = .169
    assert (kept[0] > 0).tolist() == [True, True, False, False, False]
    assert set(draw(params(min_p=0.3), 2000).tolist()) == {0, 1}


def test_truncation_is_per_row():
    rows = [params(top_k=1), params(top_p=0.7), params(min_p=0.2), params(), params(top_k=3, min_p=0.2)]
    kept = truncate(PROBS.expand(5, -1), rows) > 0  # [5, V]
    assert kept.sum(dim=-1).tolist() == [1, 2, 3, 5, 3]  # min_p 0.2 -> .113 cut-off


def test_no_truncation_keeps_every_token_exactly():
    probs = torch.softmax(torch.randn(4, 32000, generator=torch.Generator().manual_seed(9)), dim=-1)
    assert torch.equal(truncate(probs, [params()] * 4), probs)
    assert (truncate(probs, [params(top_k=32000)] * 4) > 0).all()


# ---- logprobs ------------------------------------------------------------------------------------

def test_logprobs_are_of_the_raw_distribution():
    logits = random_logits(8, 100, seed=10)
    ps = [params(temperature=0.5, top_k=10, logprobs=True), params(temperature=0), params(top_p=0.3, seed=1)] * 2
    ps += [params(min_p=0.1), params(temperature=2.0, logprobs=True)]
    gens = [None, None, torch.Generator().manual_seed(1)] * 2 + [None, None]
    result = Sampler().sample(logits, ps, gens)
    want = torch.log_softmax(logits, dim=-1).gather(1, result.token_ids[:, None]).squeeze(1)
    assert result.logprobs.dtype == torch.float32 and result.logprobs.shape == (8,)
    torch.testing.assert_close(result.logprobs, want)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 rows"):
        Sampler().sample(torch.zeros(2, 5), [params()], [None])


def test_top_k_above_the_vocabulary_keeps_every_token():
    """The largest top_k SamplingParams takes is clamped to the vocabulary (no int64 overflow)."""
    probs = torch.softmax(LOGITS[None].repeat(2, 1), dim=-1)
    assert torch.equal(truncate(probs, [params(top_k=2**31 - 1), params()]), probs)


# ---- vectorized --------------------------------------------------------------------------------

def ops_of(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def test_top_k_alone_ranks_with_topk_not_a_vocabulary_sort():
    logits = random_logits(8, 5000, seed=12)
    ps = [params(top_k=40), params(top_k=5, top_p=0.9), params(), params(temperature=0)] * 2
    ops = ops_of(lambda: Sampler().sample(logits, ps, [None] * 8))
    assert "aten::topk" in ops and "aten::sort" not in ops
    assert "aten::sort" in ops_of(lambda: Sampler().sample(logits, [params(top_p=0.9)] * 8, [None] * 8))


def test_parameters_cost_no_kernel_per_row():
    """The batch's parameters become device tensors in one go: the op count does not grow with the
    number of (unseeded) rows."""
    mixed = [params(top_k=40, min_p=0.1), params(top_p=0.8, top_k=9), params(temperature=0.5)]

    def count(rows: int) -> int:
        logits = random_logits(rows, 300, seed=13)
        return len(ops_of(lambda: Sampler().sample(logits, (mixed * rows)[:rows], [None] * rows)))

    assert count(3) == count(48)
