"""Token sampling for a batch: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Truncation is vectorised over the batch with per-row parameter tensors. The draw uses the
exponential race (argmax of p / E with E ~ Exp(1) is a sample from p): no torch.multinomial, no
host sync, and a seeded row draws its noise from its own generator so its tokens do not depend
on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from deployments.engine.params import SamplingParams


@dataclass(frozen=True)
class SampleResult:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] fp32: log p(chosen) under the raw model distribution


class Sampler:
    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]) -> SampleResult:
        """logits `[B, V]` (fp32) -> one token per row."""
        chosen = logits.argmax(dim=-1)
        if not all(p.is_greedy for p in params):
            sampled = self._sample(logits, params, generators)
            greedy = torch.tensor([p.is_greedy for p in params], device=logits.device)
            chosen = torch.where(greedy, chosen, sampled)
        logprobs = None
        if any(p.logprobs for p in params):
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None]).squeeze(1)
        return SampleResult(chosen, logprobs)

    def _sample(self, logits, params, generators) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
        probs = torch.softmax(logits / temps[:, None], dim=-1)  # [B, V]
        probs = truncate(probs, params)
        noise = torch.stack([self._exponential(probs.shape[1], g, dev) for g in generators])  # [B, V]
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _exponential(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        return torch.empty(n, device=device).exponential_(generator=generator)


def truncate(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Zero the tokens top-k, top-p and min-p drop (the most likely token always stays)."""
    dev, vocab = probs.device, probs.shape[1]
    top_k = torch.tensor([p.top_k or vocab for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(vocab, device=dev)[None, :]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
    drop = (ranks >= top_k[:, None]) | (mass_before >= top_p[:, None])
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)
