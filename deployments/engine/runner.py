"""Runs one engine step: a flattened batch of prefill chunks and decode tokens through the model,
reading and writing the paged KV cache. Returns the logits of the rows that sample.

The step's integer inputs reach the device in one copy (`StepInputs`); nothing in the step waits
for the device until the engine reads the sampled ids.

The decoder block is the model's own (`model/text.py`); the runner hands each layer an attention
function over the paged cache (the configured attention backend) and the expert backend that runs
its routed experts.

A forward pass is framed by the expert backend's `step()`. When the backend asks for two
micro-batches, the chunks are split in two halves (by tokens) run on two threads: while one half
waits for its routed experts (on the expert shards), the other computes its attention.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from deployments.engine.attention import AttentionBackend, Layout
from deployments.engine.compile import StepCompiler, opaque
from deployments.engine.experts import ExpertBackend
from deployments.engine.kv_cache import KVCache
from deployments.engine.kv_manager import KVManager
from deployments.engine.openmp import use_one_openmp_thread
from deployments.engine.scheduler import ScheduledChunk
from deployments.engine.step_inputs import StepBatch, StepInputs
from model.llama4 import Llama4
from model.moe import RoutedExperts
from model.rope import text_inv_freq, text_rope
from model.text import Attend


class ModelRunner:
    def __init__(self, model: Llama4, kv: KVManager, cache: KVCache, experts: ExpertBackend,
                 attention: AttentionBackend, compiler: StepCompiler | None = None):
        self.model = model
        self.kv = kv
        self.cache = cache
        self.experts = experts
        self.attention = attention
        # Tokens routed to each expert, summed over MoE layers (load imbalance); stays on the
        # device, read by the metrics publisher about once a second.
        self.expert_tokens = torch.zeros(max(model.cfg.text.num_local_experts, 1), dtype=torch.long,
                                         device=model.device)
        self.device = model.device
        self.inv_freq = text_inv_freq(model.cfg.text, self.device)
        self.inputs = [StepInputs(kv, self.device)]  # one staging buffer per micro-batch (they run at once)
        self.compiler = compiler
        self._forward_decode = self._forward_prefill = self._forward
        self._pad_prefill = True  # to the compiled prefill's token buckets (not when prefill runs eager)
        if compiler is not None and compiler.step_traceable:
            self._forward_decode, self._forward_prefill = compiler.compile_step(self._forward)
            if getattr(attention, "gather_prefill", False):
                # CPU: steps with prefill run eager over gathered windows (one SDPA per layer, faster there
                # than compiled flex, and their shapes need no buckets); decode-only steps stay compiled.
                # (Compiling their blocks apart, dynamic shapes, measured no faster: bench/RESULTS.md.)
                self._forward_prefill = self._forward
                self._pad_prefill = False
        self._helper: ThreadPoolExecutor | None = None  # runs the second micro-batch
        # made by the first step split in micro-batches (which count experts at once); None until
        # then, so that a step of one micro-batch counts exactly as before (and traces whole)
        self._count_lock: threading.Lock | None = None

    def idle(self) -> None:
        """Nothing to run this step (a lockstep expert backend still takes part in its group's step)."""
        self.experts.idle()

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits `[num_sampling_chunks, vocab]` (fp32), in the order of the sampling chunks."""
        with self.experts.step():
            parts = split_tokens(chunks, self.experts.micro_batches)
            if len(parts) == 1:
                with self.experts.micro_batch(0):
                    return self._logits(chunks, self.inputs[0])
            while len(self.inputs) < len(parts):
                self.inputs.append(StepInputs(self.kv, self.device))
            if self._count_lock is None:
                self._count_lock = threading.Lock()
            if self._helper is None:
                # on the CPU the helper makes no OpenMP team: one would slow every thread's parallel ops
                # (deployments/engine/openmp.py)
                self._helper = ThreadPoolExecutor(
                    max_workers=len(parts) - 1, thread_name_prefix="herd-microbatch",
                    initializer=use_one_openmp_thread if self.device.type == "cpu" else None)
            futures = [self._helper.submit(self._micro_batch, i, part) for i, part in enumerate(parts) if i]
            logits: list[torch.Tensor | None] = []
            error: BaseException | None = None
            for run in [lambda: self._micro_batch(0, parts[0]), *(f.result for f in futures)]:
                try:  # every micro-batch is waited for, even after one failed
                    logits.append(run())
                except BaseException as e:
                    error = error or e
            if error is not None:
                raise error
            return torch.cat([t for t in logits if t is not None])

    @torch.inference_mode()  # the helper thread's micro-batch too
    def _micro_batch(self, index: int, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        with self.experts.micro_batch(index):
            return self._logits(chunks, self.inputs[index]) if chunks else None

    def _logits(self, chunks: list[ScheduledChunk], inputs: StepInputs) -> torch.Tensor:
        """One micro-batch (or the whole step): its inputs staged in `inputs`, padded for the compiled
        step, embedded, through the decoder layers; the logits of its sampling chunks."""
        run, decode_only = chunks, False
        if self.compiler is not None and self.compiler.step_traceable:
            # padding chunks come after the real ones, never sample; an eager prefill is not padded
            run, decode_only = self.compiler.pad(chunks, pad_prefill=self._pad_prefill)
        batch = inputs.stage(run)
        layouts = {g.name: self.attention.layout(g, run) for g in self.kv.groups}
        x = self._embed(batch)
        row_weight = torch.zeros(x.shape[0], dtype=torch.long, device=self.device)  # 1 for real rows, 0 padding
        row_weight[: sum(c.num_tokens for c in chunks)] = 1
        forward = self._forward_decode if decode_only else self._forward_prefill
        x = forward(x, batch.positions, layouts, batch.slots, row_weight)
        return self.model.language_model.logits(x[batch.sample_rows])

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, layouts: dict[str, Layout],
                 slots: dict[str, torch.Tensor], row_weight: torch.Tensor) -> torch.Tensor:
        """The decoder layers over embeddings `x` `[T, hidden]` (what the whole-step compile traces)."""
        rope = text_rope(self.inv_freq, positions)
        per_block = self.compiler is not None and not self.compiler.step_traceable
        for i, layer in enumerate(self.model.language_model.model.layers):
            group = self.cache.group_of[i].name
            attend = self._paged_attention(i, layouts[group], slots[group])
            routed = self._routed_experts(i, row_weight)
            if per_block:
                assert self.compiler is not None
                x = self.compiler.block(layer, x, positions, rope, opaque(attend), opaque(routed))
            else:
                x = layer(x, positions, rope, attend, routed)
        return x

    def _embed(self, batch: StepBatch) -> torch.Tensor:
        """Token embeddings, with each prompt `<|patch|>` row replaced by its image embedding."""
        x = self.model.language_model.model.embed_tokens(batch.ids)
        if batch.image_embeds:
            rows = torch.cat(batch.image_embeds).to(device=x.device, dtype=x.dtype)
            x = x.index_copy(0, batch.image_rows, rows)
        return x

    def _paged_attention(self, layer: int, layout: Layout, slots: torch.Tensor) -> Attend:
        """Layer `layer`'s attention: write the new KV into the cache at `slots`, attend over it."""

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            self.cache.write(layer, k, v, slots)
            return self.attention.forward(q, self.cache.k[layer], self.cache.v[layer], layout, scale)

        return attend

    def _routed_experts(self, layer: int, row_weight: torch.Tensor) -> RoutedExperts:
        """Layer `layer`'s routed experts on the expert backend, counting tokens per expert (on the
        device, no sync; rows of weight 0, the padding, not counted)."""

        def routed(x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            weight = row_weight[:, None].expand_as(expert_ids).flatten()
            if self._count_lock is None:
                self.expert_tokens.scatter_add_(0, expert_ids.flatten(), weight)
            else:
                with self._count_lock:  # two micro-batches may count at once
                    self.expert_tokens.scatter_add_(0, expert_ids.flatten(), weight)
            return self.experts.run(layer, x, expert_ids, scores)

        return routed


def split_tokens(chunks: list[ScheduledChunk], parts: int) -> list[list[ScheduledChunk]]:
    """`chunks` in `parts` consecutive groups of about equal tokens (some may be empty); order kept."""
    if parts <= 1:
        return [chunks]
    total = sum(c.num_tokens for c in chunks)
    out: list[list[ScheduledChunk]] = [[] for _ in range(parts)]
    seen = 0
    for c in chunks:
        out[min(parts - 1, seen * parts // max(total, 1))].append(c)
        seen += c.num_tokens
    return out
