"""`Engine`: requests in, streamed tokens out. One process, one device, no Ray.

    engine = Engine.from_pretrained("checkpoints/small-scout")
    [done] = engine.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))

`add_request` / `step` / `abort` are the streaming interface the router service drives; each
`step` runs one batch (decode tokens first, then prefill chunks) and returns the deltas.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch

from deployments.engine.attention import attention_backend, resolve_attention_backend
from deployments.engine.compile import TRACEABLE_ATTENTION, CompileSettings, StepCompiler, experts_trace
from deployments.engine.config import EngineConfig
from deployments.engine.experts import (
    ColocatedExperts,
    ExpertBackend,
    ExpertBackendNotReady,
    ExpertBackendUnavailable,
)
from deployments.engine.kv_cache import KVCache
from deployments.engine.kv_manager import KVManager
from deployments.engine.kv_sizing import plan_kv_groups
from deployments.engine.kv_transfer import KVChunk, KVTransfer, SharedCachePort, SharedCacheWriter
from deployments.engine.output import RequestOutput
from deployments.engine.params import SamplingParams
from deployments.engine.request_state import RequestState
from deployments.engine.runner import ModelRunner
from deployments.engine.sampler import Sampler
from deployments.engine.scheduler import ScheduledChunk, Scheduler
from deployments.engine.sequence import ImageInput, Sequence
from deployments.engine.validation import check_encodable
from model.errors import ConfigError, InvalidInputError
from model.expert_kernel import column_major, expert_kernel, resolve_expert_kernel
from model.llama4 import Llama4
from model.moe import Experts
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
NOT_READY_RETRY_S = 0.5  # a step the expert backend could not begin is tried again after this long


class BatchUnavailable(ExpertBackendUnavailable):
    """The expert backend failed while a batch ran: its requests (`request_ids`) were in flight and
    must fail (UNAVAILABLE); the engine's other requests were not touched."""

    def __init__(self, request_ids: list[str], error: ExpertBackendUnavailable):
        super().__init__(str(error))
        self.request_ids = request_ids


class EngineOverloaded(RuntimeError):
    """Too many queued requests: retry later (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""


@dataclass
class Completion:
    """A finished request (the result of `Engine.generate`)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    outputs: list[RequestOutput] = field(default_factory=list, repr=False)


class Engine:
    def __init__(self, model: Llama4, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 experts: ExpertBackend | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        use_expert_kernel(model, self.config.expert_kernel)
        groups = plan_kv_groups(model.cfg.text, self.config, model.dtype)
        self.kv = KVManager(groups, self.config.block_size)
        text = model.cfg.text
        cache = KVCache(groups, self.config.block_size, text.num_key_value_heads, text.head_dim, model.dtype,
                        model.device)
        attention = attention_backend(resolve_attention_backend(self.config.attention_backend, model.device))(
            self.kv, model.device)
        experts = experts or ColocatedExperts(model)
        compiler = self._compiler(model.device, colocated=isinstance(experts, ColocatedExperts))
        if compiler is not None and compiler.step_traceable and model.device.type == "cpu":
            store_experts_column_major(model)  # for the compiled decode step's per-row experts
        self.runner = ModelRunner(model, self.kv, cache, experts, attention, compiler)
        self.scheduler = Scheduler(self.config, self.kv)
        self.sampler = Sampler()
        self.max_model_len = min(self.config.max_model_len or text.max_position_embeddings,
                                 self.kv.max_tokens_per_seq())
        self.eos_ids = tuple(text.eos_token_id) or tokenizer.stop_ids
        self._states: dict[str, RequestState] = {}
        self._arrivals = itertools.count()
        self.shared_cache: SharedCachePort | None = None
        self.num_steps = 0  # steps that ran a batch (a step with nothing schedulable does not count)
        log.info("engine ready: %s; max_model_len %d", ", ".join(f"{g.name} KV {g.num_blocks} blocks x "
                 f"{len(g.layers)} layers" for g in groups), self.max_model_len)

    def _compiler(self, device: torch.device, *, colocated: bool) -> StepCompiler | None:
        """The step compiler `config.compile` / `cuda_graphs` ask for on `device` (None: eager).
        Experts run elsewhere (`colocated` False: Ray calls, the expert group's exchanges) never trace."""
        try:
            settings = CompileSettings.resolve(self.config.compile, self.config.cuda_graphs, device)
        except ValueError as e:
            raise ConfigError(f"engine config: {e}") from None
        if not settings.compile:
            return None
        backend = resolve_attention_backend(self.config.attention_backend, device)
        kernel = resolve_expert_kernel(self.config.expert_kernel, device, quantized=experts_quantized(self.model))
        traceable = backend in TRACEABLE_ATTENTION, colocated and experts_trace(kernel, self.model.dtype)
        if settings.cuda_graphs and not all(traceable):
            log.info("cuda_graphs: attention %s / experts %s in %s do not trace: compiling without CUDA graphs",
                     backend, kernel, self.model.dtype)
            settings = CompileSettings(True, False, settings.backend)
        return StepCompiler(settings, self.kv, self.config.max_num_seqs, attention_traceable=traceable[0],
                            experts_traceable=traceable[1])

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, *, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, quantization: str = "none") -> Engine:
        """`quantization`: the routed experts' (none | fp8 | int4; model/quantization.py)."""
        from model.checkpoint import load

        return cls(load(path, device=device, dtype=dtype, quantization=quantization), Tokenizer.from_dir(path), config)

    # ---- the shared prefix cache ------------------------------------------------------------
    def attach_shared_cache(self, writer: SharedCacheWriter) -> None:
        """Offer every newly computed chunk (prompt, then answer) to `writer` and accept fetched chunks
        in `add_request(shared_chunks=...)` (deployments/shared_cache)."""
        self.shared_cache = SharedCachePort(self.kv, self.runner.cache, writer)

    def prefix_chunks(self, prompt_ids: Seq[int], images: Seq[ImageInput] = (),
                      cache_salt: str = "") -> tuple[list[bytes], int]:
        """Digests of a prompt's reusable chunks, and how many leading ones the local cache holds
        (a hint: read without the engine thread). Needs `attach_shared_cache`."""
        if self.shared_cache is None:
            raise RuntimeError("prefix_chunks needs attach_shared_cache first")
        check_encodable("tenant (cache_salt)", cache_salt)
        probe = Sequence(request_id="probe", tokens=list(prompt_ids), num_prompt_tokens=len(prompt_ids), params=None,
                         arrival=-1, patch_token_id=self.model.cfg.image_token_index, images=list(images),
                         cache_salt=cache_salt)
        return self.shared_cache.prefix_chunks(probe)

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, prompt_ids: Seq[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, images: Seq[ImageInput] = (), cache_salt: str = "",
                    shared_chunks: Seq[KVChunk] = (), num_shared_chunks: int = 0) -> str:
        """Queue a request; raises InvalidInputError for a bad prompt, EngineOverloaded when full.
        `shared_chunks`: prompt chunks fetched from the shared prefix cache (loaded into the local
        cache); `num_shared_chunks`: leading chunks the shared cache already holds (not offered again)."""
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._arrivals)}"
        if request_id in self._states:
            raise InvalidInputError(f"request_id {request_id!r} is already running")
        check_encodable("request_id", request_id)
        check_encodable("tenant (cache_salt)", cache_salt)  # hashed into every block key of the request
        ids = self._check_prompt_ids(prompt_ids)
        if len(ids) >= self.max_model_len:
            raise InvalidInputError(f"prompt of {len(ids)} tokens is too long: this engine takes at most "
                                    f"{self.max_model_len - 1} prompt tokens")
        self.check_queue()
        seq = Sequence(request_id=request_id, tokens=ids, num_prompt_tokens=len(ids), params=params,
                       arrival=next(self._arrivals), patch_token_id=self.model.cfg.image_token_index,
                       images=list(images), cache_salt=cache_salt, generator=self._generator(params))
        self._check_images(seq)
        if self.shared_cache is not None:
            seq.transfer = KVTransfer(seq, self.shared_cache, num_known_chunks=num_shared_chunks)
            seq.transfer.load(shared_chunks)
        self._states[request_id] = RequestState(seq, self.tokenizer, self.max_model_len, self.eos_ids)
        self.scheduler.add(seq)
        return request_id

    def _check_prompt_ids(self, prompt_ids: Seq[int]) -> list[int]:
        """The prompt as a list of ints in the vocabulary, else InvalidInputError naming the problem."""
        try:
            ids = torch.as_tensor(list(prompt_ids), dtype=torch.long)
        except (OverflowError, RuntimeError, TypeError, ValueError) as e:  # e.g. an id >= 2**63
            raise InvalidInputError(f"prompt token ids must be integers in [0, {self.model.cfg.text.vocab_size}): "
                                    f"{e}") from None
        return self.model.check_token_ids(ids).tolist()

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None:
            return None
        return torch.Generator(self.model.device).manual_seed(params.seed)

    def _check_images(self, seq: Sequence) -> None:
        num_patch = sum(1 for t in seq.tokens if t == seq.patch_token_id)
        num_rows = sum(img.embeds.shape[0] for img in seq.images)
        if num_patch != num_rows:
            raise InvalidInputError(f"the prompt has {num_patch} <|patch|> tokens but its images give {num_rows} "
                                    "embeddings: expand each image placeholder with model.prompt.expand_image_tokens")

    def check_queue(self) -> None:
        """EngineOverloaded when `max_waiting` requests wait beyond the running slots that are free: a
        request that will be admitted at the next step (a slot freed by one that just finished) is
        not counted as waiting. Safe to call off the engine thread (reads two lengths)."""
        waiting = len(self.scheduler.waiting) - max(0, self.config.max_num_seqs - len(self.scheduler.running))
        if waiting >= self.config.max_waiting:
            raise EngineOverloaded(f"{waiting} requests are already waiting; retry later")

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its KV blocks at once; False if it is unknown or done."""
        state = self._states.pop(request_id, None)
        if state is None:
            return False
        self.scheduler.finish(state.seq)
        return True

    @property
    def lockstep(self) -> bool:
        """The expert backend steps in lockstep with others: the engine must call `idle` whenever it has
        nothing to run (`AsyncEngine` does)."""
        return self.runner.experts.lockstep

    def idle(self) -> None:
        """Nothing to run: let the expert backend take part in its group's step."""
        self.runner.idle()

    def has_unfinished(self) -> bool:
        return bool(self._states)

    def progress(self) -> tuple[int, int]:
        """Changes whenever a step did something (ran a batch, or preempted): a step that leaves it
        unchanged could not move any request forward."""
        return self.num_steps, self.scheduler.num_preemptions

    # ---- stepping ----------------------------------------------------------------------------
    # Failure isolation. One request's bad state (a value that passed validation but breaks the
    # model, the sampler or the bookkeeping) must not fail the others in its batch. Running a batch
    # changes nothing until it succeeded: the runner only writes KV into slots the scheduler already
    # allocated (a rerun writes the same values again), the scheduler advances `num_computed` and
    # registers blocks only in `postprocess`, and the seeded generators are put back before a rerun.
    # So when running a batch raises, it is split in halves and each half is run again, down to the
    # single chunk that fails alone: that request finishes with finish_reason "error" (and `error`
    # saying why), its KV is freed, the rest carry on with the tokens they would have had.
    # An unavailable expert backend is nobody's fault: `step` raises `BatchUnavailable` naming the
    # batch's requests (in flight when the backend failed: the caller fails them) and lets
    # `ExpertBackendNotReady` through (no step could begin: nothing is lost, the caller retries).
    def step(self) -> list[RequestOutput]:
        """Run one batch; return a delta for every request that produced tokens or finished (a
        request that broke the batch finishes alone with finish_reason "error")."""
        chunks = self.scheduler.schedule()
        if not chunks:
            self.runner.idle()
            return []
        self.num_steps += 1
        try:
            return self._run(chunks)
        except ExpertBackendNotReady:
            raise
        except ExpertBackendUnavailable as e:
            raise BatchUnavailable([c.seq.request_id for c in chunks], e) from e

    def _run(self, chunks: list[ScheduledChunk]) -> list[RequestOutput]:
        """Run `chunks` (execute + sample, then record), bisecting on failure to the culprits."""
        saved = [(s.generator, s.generator.get_state()) for s in (c.seq for c in chunks) if s.generator is not None]
        try:
            sampling, token_ids, logprobs = self._execute(chunks)
        except ExpertBackendUnavailable:
            raise
        except Exception as e:
            if len(chunks) == 1:
                return [self._fail(chunks[0].seq, e)]
            log.warning("a step of %d chunks failed (%s: %s); rerunning it in halves to find the request "
                        "that caused it", len(chunks), type(e).__name__, e)
            for generator, state in saved:
                generator.set_state(state)
            mid = len(chunks) // 2
            return self._run(chunks[:mid]) + self._run(chunks[mid:])
        outputs: list[RequestOutput] = []
        failed: set[int] = set()
        for c in chunks:  # one chunk at a time, so that a failure is that request's
            try:
                self.scheduler.postprocess([c])
            except Exception as e:
                failed.add(id(c.seq))
                outputs.append(self._fail(c.seq, e))
        for seq, tok, lp in zip(sampling, token_ids, logprobs, strict=True):
            if id(seq) in failed:
                continue
            try:
                outputs.append(self._advance(seq, tok, lp))
            except Exception as e:
                outputs.append(self._fail(seq, e))
        return outputs

    def _execute(self, chunks: list[ScheduledChunk]) -> tuple[list[Sequence], list[int], list[float | None]]:
        """Run the model over `chunks` and sample the next token of those that sample; no state changes."""
        logits = self.runner.execute(chunks)
        sampling = [c.seq for c in chunks if c.samples]
        if not sampling:
            return [], [], []
        # add_request gives every scheduled sequence its params (only prefix_chunks' probe has none)
        params = cast("list[SamplingParams]", [s.params for s in sampling])
        result = self.sampler.sample(logits, params, [s.generator for s in sampling])
        token_ids = result.token_ids.tolist()
        logprobs = result.logprobs.tolist() if result.logprobs is not None else [None] * len(sampling)
        return sampling, token_ids, logprobs

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        """Finish `seq` alone because running it raised `error`: free its KV, say why."""
        log.error("request %s failed in an engine step and was stopped alone: %s: %s", seq.request_id,
                  type(error).__name__, error, exc_info=error)
        self._states.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        return RequestOutput(seq.request_id, [], "", finish_reason="error", error=f"{type(error).__name__}: {error}",
                             num_prompt_tokens=seq.num_prompt_tokens, num_generated_tokens=seq.num_generated,
                             num_cached_tokens=seq.num_cached_prompt_tokens)

    def _advance(self, seq: Sequence, token_id: int, logprob: float | None) -> RequestOutput:
        state = self._states[seq.request_id]
        output = state.append(token_id, logprob)
        if output.finished:
            self.scheduler.finish(seq)
            del self._states[seq.request_id]
        return output

    # ---- offline -----------------------------------------------------------------------------
    def generate(self, prompts: Seq[Seq[int] | str], params: SamplingParams | Seq[SamplingParams] | None = None,
                 images: Seq[Seq[ImageInput]] | None = None) -> list[Completion]:
        """Run prompts (token ids, or text tokenized with BOS) to completion, batched together."""
        params_list = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.tokenizer.encode(p, add_bos=True) if isinstance(p, str) else list(p) for p in prompts]
        rids = [self.add_request(i, p, images=(images[n] if images else ())) for n, (i, p) in
                enumerate(zip(ids, params_list, strict=False))]
        done: dict[str, list[RequestOutput]] = {r: [] for r in rids}
        outage: float | None = None  # since when the expert backend could not begin a step
        while self.has_unfinished():
            try:
                outputs = self.step()
            except ExpertBackendNotReady:  # nothing ran (its group forms): wait for it, as AsyncEngine does
                outage = outage or time.monotonic()
                if time.monotonic() - outage > self.config.expert_wait_s:
                    raise
                time.sleep(NOT_READY_RETRY_S)
                continue
            outage = None
            for out in outputs:
                done[out.request_id].append(out)
        return [_completion(r, done[r]) for r in rids]


def use_expert_kernel(model: Llama4, name: str) -> None:
    """Run the model's own routed experts with kernel `name` (`engine.expert_kernel`; `auto`
    resolved on the model's device)."""
    kernel = expert_kernel(resolve_expert_kernel(name, model.device, quantized=experts_quantized(model)))
    for module in model.modules():
        if isinstance(module, Experts):
            module.kernel = kernel


def store_experts_column_major(model: Llama4) -> None:
    """Store the model's dense routed-expert weights column-major per expert (model/expert_kernel.py:
    `column_major`; the same values and shapes, another memory layout)."""
    for module in model.modules():
        if isinstance(module, Experts) and isinstance(module.gate_up_proj, torch.Tensor) \
                and isinstance(module.down_proj, torch.Tensor):
            module.set_weights(column_major(module.gate_up_proj.data), column_major(module.down_proj.data))


def experts_quantized(model: Llama4) -> bool:
    """Whether the model's routed experts hold quantized weights (FP8 checkpoint or on-the-fly)."""
    return any(isinstance(m, Experts) and not isinstance(m.gate_up_proj, torch.Tensor) for m in model.modules())


def _completion(request_id: str, outputs: list[RequestOutput]) -> Completion:
    last = outputs[-1]
    assert last.finish_reason is not None  # generate() runs every request to its end
    logprobs = [lp for o in outputs for lp in (o.logprobs or [])] or None
    return Completion(
        request_id, [t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs),
        last.finish_reason, logprobs, last.num_prompt_tokens, last.num_cached_tokens, outputs,
    )
