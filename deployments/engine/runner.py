"""Runs one engine step: a flattened batch of prefill chunks and decode tokens through the model,
reading and writing the paged KV cache. Returns the logits of the rows that sample.

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
from deployments.engine.experts import ExpertBackend
from deployments.engine.kv_cache import KVCache
from deployments.engine.kv_manager import KVManager
from deployments.engine.scheduler import ScheduledChunk
from model.llama4 import Llama4
from model.moe import RoutedExperts
from model.rope import text_freqs_cis, text_inv_freq
from model.text import Attend


class ModelRunner:
    def __init__(self, model: Llama4, kv: KVManager, cache: KVCache, experts: ExpertBackend,
                 attention: AttentionBackend):
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

        self._helper: ThreadPoolExecutor | None = None  # runs the second micro-batch
        self._count_lock = threading.Lock()

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
                    return self._forward(chunks)
            if self._helper is None:
                self._helper = ThreadPoolExecutor(max_workers=len(parts) - 1, thread_name_prefix="herd-microbatch")
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

    def _micro_batch(self, index: int, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        with self.experts.micro_batch(index):
            return self._forward(chunks) if chunks else None

    @torch.inference_mode()
    def _forward(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        ids, positions = self._inputs(chunks)
        layouts = {g.name: self.attention.layout(g, chunks) for g in self.kv.groups}
        x = self._embed(ids, chunks)
        freqs_cis = text_freqs_cis(self.inv_freq, positions)
        for i, layer in enumerate(self.model.language_model.model.layers):
            attend = self._paged_attention(i, layouts[self.cache.group_of[i].name])
            x = layer(x, positions, freqs_cis, attend, self._routed_experts(i))
        rows, end = [], 0
        for c in chunks:
            end += c.num_tokens
            if c.samples:
                rows.append(end - 1)
        text = self.model.language_model
        return text.lm_head(text.model.norm(x[rows])).float()

    def _inputs(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        pos: list[int] = []
        for c in chunks:
            ids.extend(c.seq.tokens[c.start : c.start + c.num_tokens])
            pos.extend(range(c.start, c.start + c.num_tokens))
        return (torch.tensor(ids, dtype=torch.long, device=self.device),
                torch.tensor(pos, dtype=torch.long, device=self.device))

    def _embed(self, ids: torch.Tensor, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Token embeddings, with each prompt `<|patch|>` row replaced by its image embedding."""
        x = self.model.language_model.model.embed_tokens(ids)
        row = 0
        for c in chunks:
            start = c.start
            image_rows = c.seq.image_rows(start, start + c.num_tokens)
            if image_rows is not None:
                prompt_end = min(c.num_tokens, c.seq.num_prompt_tokens - start)
                assert c.seq.patch_token_id is not None  # a prompt with image rows has <|patch|> tokens
                local = (ids[row : row + prompt_end] == c.seq.patch_token_id).nonzero().squeeze(1) + row
                x[local] = image_rows.to(device=x.device, dtype=x.dtype)
            row += c.num_tokens
        return x

    def _paged_attention(self, layer: int, layout: Layout) -> Attend:
        """Layer `layer`'s attention: write the new KV into the cache, attend over it."""

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            self.cache.write(layer, k, v, layout.slots)
            return self.attention.forward(q, self.cache.k[layer], self.cache.v[layer], layout, scale)

        return attend

    def _routed_experts(self, layer: int) -> RoutedExperts:
        """Layer `layer`'s routed experts on the expert backend, counting tokens per expert."""

        def routed(x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            counts = torch.bincount(expert_ids.flatten(), minlength=self.expert_tokens.numel())
            with self._count_lock:  # two micro-batches may count at once
                self.expert_tokens += counts
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
