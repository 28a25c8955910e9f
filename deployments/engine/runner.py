"""Runs one engine step: a flattened batch of prefill chunks and decode tokens through the model,
reading and writing the paged KV cache. Returns the logits of the rows that sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deployments.engine.attention import BatchLayout, SeqSlice, paged_attention
from deployments.engine.experts import ExpertBackend
from deployments.engine.kv_cache import KVCache
from deployments.engine.kv_manager import KVGroup, KVManager
from deployments.engine.sequence import Sequence
from model.llama4 import Llama4
from model.rope import text_freqs_cis, text_inv_freq


@dataclass(frozen=True)
class ScheduledChunk:
    """`seq.tokens[start : start + num_tokens]` run this step (`start` = `seq.num_computed` when
    scheduled); `samples`: the chunk ends at the last known token, so its logits pick the next."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool

    @classmethod
    def of(cls, seq: Sequence, num_tokens: int) -> "ScheduledChunk":
        start = seq.num_computed
        return cls(seq, start, num_tokens, start + num_tokens == seq.num_tokens)


class ModelRunner:
    def __init__(self, model: Llama4, kv: KVManager, cache: KVCache, experts: ExpertBackend):
        self.model = model
        self.kv = kv
        self.cache = cache
        self.experts = experts
        # Tokens routed to each expert, summed over MoE layers (load imbalance); stays on the
        # device, read by the metrics publisher about once a second.
        self.expert_tokens = torch.zeros(max(model.cfg.text.num_local_experts, 1), dtype=torch.long,
                                         device=model.device)
        self.device = model.device
        self.inv_freq = text_inv_freq(model.cfg.text, self.device)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits `[num_sampling_chunks, vocab]` (fp32), in the order of the sampling chunks."""
        ids, positions = self._inputs(chunks)
        layouts = {g.name: self._layout(g, chunks) for g in self.kv.groups}
        x = self._embed(ids, chunks)
        freqs_cis = text_freqs_cis(self.inv_freq, positions)
        for i, layer in enumerate(self.model.language_model.model.layers):
            x = self._layer(i, layer, x, positions, freqs_cis, layouts[self.cache.group_of[i].name])
        rows, end = [], 0
        for c in chunks:
            end += c.num_tokens
            if c.samples:
                rows.append(end - 1)
        text = self.model.language_model
        return text.lm_head(text.model.norm(x[rows])).float()

    def _inputs(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pos = [], []
        for c in chunks:
            start = c.start
            ids.extend(c.seq.tokens[start : start + c.num_tokens])
            pos.extend(range(start, start + c.num_tokens))
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=self.device)  # noqa: E731
        return as_tensor(ids), as_tensor(pos)

    def _layout(self, group: KVGroup, chunks: list[ScheduledChunk]) -> BatchLayout:
        bs = self.kv.block_size
        seqs, slots, row = [], [], 0
        for c in chunks:
            start, table = c.start, c.seq.tables[group.name]
            window = self.kv.window_start(group, start)
            last_block = (start + c.num_tokens - 1) // bs
            blocks = torch.tensor(table[window // bs : last_block + 1], dtype=torch.long, device=self.device)
            seqs.append(SeqSlice(row, c.num_tokens, start, window, blocks))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + c.num_tokens))
            row += c.num_tokens
        return BatchLayout(seqs, torch.tensor(slots, dtype=torch.long, device=self.device), group.chunk)

    def _embed(self, ids: torch.Tensor, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Token embeddings, with each prompt `<|patch|>` row replaced by its image embedding."""
        x = self.model.language_model.model.embed_tokens(ids)
        row = 0
        for c in chunks:
            start = c.start
            image_rows = c.seq.image_rows(start, start + c.num_tokens)
            if image_rows is not None:
                prompt_end = min(c.num_tokens, c.seq.num_prompt_tokens - start)
                local = (ids[row : row + prompt_end] == c.seq.patch_token_id).nonzero().squeeze(1) + row
                x[local] = image_rows.to(device=x.device, dtype=x.dtype)
            row += c.num_tokens
        return x

    def _layer(self, i, layer, x, positions, freqs_cis, layout: BatchLayout) -> torch.Tensor:
        attn = layer.self_attn
        q, k, v = attn.qkv(layer.input_layernorm(x), positions, freqs_cis)
        self.cache.write(i, k, v, layout.slots)
        o = paged_attention(q, self.cache.k[i], self.cache.v[i], layout, attn.scale)
        h = x + attn.o_proj(o.flatten(1))
        return h + self._feed_forward(i, layer, layer.post_attention_layernorm(h))

    def _feed_forward(self, i, layer, h: torch.Tensor) -> torch.Tensor:
        ff = layer.feed_forward
        if not layer.is_moe:
            return ff(h)
        expert_ids, scores = ff.router.route(h)
        self.expert_tokens += torch.bincount(expert_ids.flatten(), minlength=self.expert_tokens.numel())
        return ff.shared_expert(h) + self.experts.run(i, h, expert_ids, scores)
