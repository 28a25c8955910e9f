"""Failure isolation: a request that breaks an engine step (in the model run or in sampling) is
stopped alone with finish_reason "error"; the other requests of its batches get the tokens they get
without it and no KV block leaks. A duplicate request id is refused without touching the running one."""

import asyncio

import pytest

from deployments.engine.async_engine import AsyncEngine, EngineStepError, RequestFailed
from deployments.engine.config import EngineConfig
from deployments.engine.engine import BatchUnavailable, Engine
from deployments.engine.experts import ExpertBackendNotReady, ExpertBackendUnavailable
from deployments.engine.params import SamplingParams
from model.errors import InvalidInputError

CFG = EngineConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=8)
POISON = 77  # a token id the fault-injecting runner refuses to run
PROMPTS = [[1] + [(5 * i + 3 * n) % 400 + 100 for i in range(9 + 4 * n)] for n in range(3)]
POISONED = [1] + [(11 * i) % 400 + 100 for i in range(12)] + [POISON] + [150] * 6  # poison in a later chunk


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def seeded(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=1.0, seed=1234, ignore_eos=True)


class PoisonedRunner:
    """Fault injection: the real runner, except that a batch holding POISON among the tokens it runs raises."""

    def __init__(self, runner, error: type[Exception] = RuntimeError):
        self.runner, self.error, self.calls = runner, error, 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, chunks):
        self.calls += 1
        if any(POISON in c.seq.tokens[c.start:c.start + c.num_tokens] for c in chunks):
            raise self.error("poisoned token in the batch")
        return self.runner.execute(chunks)


class PoisonedSampler:
    """Fault injection after the draw: the real sampler (seeded generators advance), then raises
    when the batch holds the poisoned params."""

    def __init__(self, sampler, bad: SamplingParams):
        self.sampler, self.bad = sampler, bad

    def sample(self, logits, params, generators):
        result = self.sampler.sample(logits, params, generators)
        if any(p is self.bad for p in params):
            raise ValueError("poisoned sampling params")
        return result


@pytest.fixture(scope="module")
def path(scout_ckpt):
    return scout_ckpt[1]


def used(engine) -> int:
    return sum(p.num_used for p in engine.kv.pools.values())


def params_for(n: int) -> SamplingParams:
    return seeded(10) if n == 1 else greedy(10)


@pytest.fixture(scope="module")
def alone(path):
    """Each good prompt's completion without the poisoned request (the reference)."""
    engine = Engine.from_pretrained(path, CFG)
    return [engine.generate([p], params_for(n))[0].token_ids for n, p in enumerate(PROMPTS)]


def run_all(engine, requests):
    ids = [engine.add_request(p, sp, request_id=rid) for rid, p, sp in requests]
    outs: dict[str, list] = {r: [] for r in ids}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id].append(out)
    return outs


def test_a_request_that_breaks_the_model_run_fails_alone(path, alone):
    engine = Engine.from_pretrained(path, CFG)
    engine.runner = PoisonedRunner(engine.runner)
    requests = [(f"good{n}", p, params_for(n)) for n, p in enumerate(PROMPTS)]
    requests.insert(1, ("bad", POISONED, greedy(10)))
    outs = run_all(engine, requests)
    last = outs["bad"][-1]
    assert last.finish_reason == "error" and "poisoned token" in last.error
    assert not any(t for o in outs["bad"] for t in o.token_ids)  # it never got as far as sampling
    for n in range(len(PROMPTS)):
        got = outs[f"good{n}"]
        assert [t for o in got for t in o.token_ids] == alone[n]
        assert got[-1].finish_reason == "length" and got[-1].error is None
    assert used(engine) == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_a_request_that_breaks_sampling_fails_alone(path, alone):
    """Sampling fails after seeded rows drew their noise: the rerun restores their generators."""
    engine = Engine.from_pretrained(path, CFG)
    bad = greedy(10)
    engine.sampler = PoisonedSampler(engine.sampler, bad)
    requests = [(f"good{n}", p, params_for(n)) for n, p in enumerate(PROMPTS)]
    requests.append(("bad", PROMPTS[0], bad))
    outs = run_all(engine, requests)
    assert outs["bad"][-1].finish_reason == "error" and "poisoned sampling" in outs["bad"][-1].error
    for n in range(len(PROMPTS)):
        assert [t for o in outs[f"good{n}"] for t in o.token_ids] == alone[n]
    assert used(engine) == 0


def test_an_unavailable_backend_fails_the_step_without_bisecting(path):
    engine = Engine.from_pretrained(path, CFG)
    runner = engine.runner = PoisonedRunner(engine.runner, error=ExpertBackendUnavailable)
    engine.add_request(PROMPTS[0], greedy(4))
    engine.add_request(POISONED[:14], greedy(4))
    ids = list(engine._states)
    with pytest.raises(BatchUnavailable) as failed:
        for _ in range(10):  # the poison is in the second prompt's second chunk
            before = runner.calls
            engine.step()
    assert runner.calls == before + 1  # raised at once: no rerun of halves
    assert sorted(failed.value.request_ids) == sorted(ids)  # the batch's requests, for the caller to fail


class FlakyBackendRunner:
    """Fault injection at the expert backend: the real runner, except that `execute` calls listed in
    `not_ready` raise ExpertBackendNotReady (no step could begin) and those in `fail` raise
    ExpertBackendUnavailable (the backend died under the batch)."""

    def __init__(self, runner, not_ready=(), fail=()):
        self.runner, self.not_ready, self.fail, self.calls = runner, set(not_ready), set(fail), 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, chunks):
        self.calls += 1
        if self.calls in self.not_ready:
            raise ExpertBackendNotReady("the expert group re-forms")
        if self.calls in self.fail:
            raise ExpertBackendUnavailable("a shard died at MoE layer 0")
        return self.runner.execute(chunks)


async def _collect(engine, rid, prompt, params):
    return [o async for o in engine.generate(rid, prompt, params)]


def _tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def test_async_requests_wait_while_the_backend_cannot_begin_a_step(path, alone):
    """Steps that cannot begin (a shard restarting) lose nothing: the requests wait and then get the
    tokens they get without the outage."""
    async def main():
        inner = Engine.from_pretrained(path, CFG)
        inner.runner = FlakyBackendRunner(inner.runner, not_ready={1, 2, 3, 6, 7})
        engine = AsyncEngine(inner)
        engine.lockstep_retry_s = 0.01
        got = await asyncio.gather(_collect(engine, "a", PROMPTS[0], greedy(10)),
                                   _collect(engine, "b", PROMPTS[2], greedy(10)))
        return got, inner

    (a, b), inner = asyncio.run(asyncio.wait_for(main(), 120))
    assert _tokens(a) == alone[0] and _tokens(b) == alone[2]
    assert inner.runner.calls > 5 and used(inner) == 0


def test_async_backend_failure_fails_the_batch_only(path, alone):
    """The backend dies under a batch: that batch's request fails with EngineStepError (UNAVAILABLE);
    the request waiting for admission (not in the batch) is served as if nothing happened."""
    async def main():
        inner = Engine.from_pretrained(path, CFG.model_copy(update={"max_num_seqs": 1}))
        inner.runner = FlakyBackendRunner(inner.runner, fail={4})
        engine = AsyncEngine(inner)
        got = await asyncio.gather(_collect(engine, "running", PROMPTS[0], greedy(10)),
                                   _collect(engine, "waiting", PROMPTS[2], greedy(10)), return_exceptions=True)
        return got, inner

    (running, waiting), inner = asyncio.run(asyncio.wait_for(main(), 120))
    assert isinstance(running, EngineStepError) and "shard died" in str(running)
    assert _tokens(waiting) == alone[2]
    assert used(inner) == 0 and not inner.has_unfinished()


def test_async_backend_gone_longer_than_expert_wait_fails_requests_fast(path):
    async def main():
        inner = Engine.from_pretrained(path, CFG.model_copy(update={"expert_wait_s": 0.3}))
        inner.runner = FlakyBackendRunner(inner.runner, not_ready=range(1, 10**6))
        engine = AsyncEngine(inner)
        engine.lockstep_retry_s = 0.01
        first = await asyncio.gather(_collect(engine, "a", PROMPTS[0], greedy(4)), return_exceptions=True)
        later = await asyncio.gather(_collect(engine, "b", PROMPTS[1], greedy(4)), return_exceptions=True)
        return first + later, inner

    (first, later), inner = asyncio.run(asyncio.wait_for(main(), 60))
    assert isinstance(first, EngineStepError) and "re-forms" in str(first)
    assert isinstance(later, EngineStepError)  # the outage goes on: no new wait
    assert used(inner) == 0 and not inner.has_unfinished()


@pytest.mark.parametrize("kwargs, field", [
    (dict(cache_salt="\udcff"), "tenant"),
    (dict(request_id="r\udcff"), "request_id"),
])
def test_unencodable_strings_are_refused_at_add_request(path, kwargs, field):
    engine = Engine.from_pretrained(path, CFG)
    with pytest.raises(InvalidInputError, match=field):
        engine.add_request(PROMPTS[0], greedy(2), **kwargs)
    assert not engine.has_unfinished()


def test_huge_prompt_token_ids_are_invalid_input(path):
    engine = Engine.from_pretrained(path, CFG)
    for ids in ([1, 2**63], [1, 2**70], [1, -(2**64)]):
        with pytest.raises(InvalidInputError, match="token id"):
            engine.add_request(ids, greedy(2))


def test_async_duplicate_id_is_refused_and_the_first_completes(path, alone):
    async def main():
        engine = AsyncEngine(Engine.from_pretrained(path, CFG))
        first = engine.generate("same", PROMPTS[0], greedy(10))
        got = [await first.__anext__()]
        with pytest.raises(InvalidInputError, match="request_id"):
            async for _ in engine.generate("same", PROMPTS[1], greedy(10)):
                pass
        got += [o async for o in first]
        return got

    got = asyncio.run(asyncio.wait_for(main(), 120))
    assert [t for o in got for t in o.token_ids] == alone[0]
    assert got[-1].finish_reason == "length"


def test_async_failed_request_gets_its_error_and_others_finish(path, alone):
    async def collect(engine, rid, prompt, params):
        return [o async for o in engine.generate(rid, prompt, params)]

    async def main():
        inner = Engine.from_pretrained(path, CFG)
        inner.runner = PoisonedRunner(inner.runner)
        engine = AsyncEngine(inner)
        return await asyncio.gather(collect(engine, "good", PROMPTS[0], greedy(10)),
                                    collect(engine, "bad", POISONED, greedy(10)), return_exceptions=True)

    good, bad = asyncio.run(asyncio.wait_for(main(), 120))
    assert isinstance(bad, RequestFailed) and "poisoned token" in str(bad)
    assert [t for o in good for t in o.token_ids] == alone[0]
