"""Token sampling for a batch: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Order (as Hugging Face's warpers and vLLM): temperature, then top-k, then top-p over what top-k
left (renormalised), then min-p (relative to the top token, so renormalising does not change it).
Truncation runs as tensor ops over the whole batch with per-row parameter tensors.

The draw is the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. is a sample from p. It
needs no torch.multinomial (no host sync), and a seeded row draws its noise from its own
generator, so its tokens do not depend on what else is in the batch. Only that draw loops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deployments.engine.params import SamplingParams


@dataclass(frozen=True)
class SampleResult:
    """One sampled token per row, and its log-probability when any row asked for it."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] fp32: log p(chosen) under the raw model distribution


class Sampler:
    """Stateless: all randomness comes from the generators passed in (or the global RNG)."""

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]) -> SampleResult:
        """Pick one token per row of `logits` [B, V].

        `generators[i]` is row i's own generator (seeded requests; on the logits' device) or None
        (the device's global RNG). Greedy rows take the argmax (ties -> lowest id) and draw nothing.
        """
        if not len(params) == len(generators) == logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} rows of logits, {len(params)} params, {len(generators)} generators")
        logits = logits.float()  # [B, V]
        token_ids = logits.argmax(dim=-1)  # [B]
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if len(rows) == len(params):
            token_ids = sample_rows(logits, params, generators)
        elif rows:
            index = torch.tensor(rows, device=logits.device)  # [R]
            picked = sample_rows(logits[index], [params[i] for i in rows], [generators[i] for i in rows])
            token_ids = token_ids.index_copy(0, index, picked)
        logprobs = None
        if any(p.logprobs for p in params):
            chosen = logits.gather(1, token_ids[:, None]).squeeze(1)  # [B]
            logprobs = chosen - logits.logsumexp(dim=-1)  # [B] = log_softmax(logits)[chosen]
        return SampleResult(token_ids, logprobs)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Temperature, truncation and the exponential race for rows that all sample: [R, V] -> [R]."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)  # [R]
    probs = torch.softmax(logits / temps[:, None], dim=-1)  # [R, V]
    probs = truncate(probs, params)
    noise = exponential_noise(probs.shape, generators, probs.device)  # [R, V]
    return (probs / noise).argmax(dim=-1)  # [R]


def exponential_noise(shape: torch.Size, generators: Sequence[torch.Generator | None],
                      device: torch.device) -> torch.Tensor:
    """Exp(1) noise [R, V]: row i from generators[i], rows without one in one draw from the global RNG."""
    noise = torch.empty(shape, device=device)  # [R, V]
    shared = [i for i, g in enumerate(generators) if g is None]
    if len(shared) == len(generators):
        noise.exponential_()
    elif shared:
        noise[shared] = torch.empty(len(shared), shape[1], device=device).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)  # a contiguous row: same draw as a batch of one
    # Exp(1) can round to 0; p / 0 would be inf (or nan for a dropped token) and win the race.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def truncate(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Zero the tokens top-k, top-p and min-p drop from `probs` [R, V] (not renormalised).

    The most likely token always stays. top-k keeps exactly k tokens (ties broken by sort order).
    """
    if any(p.top_k or p.top_p < 1.0 for p in params):
        probs = _top_k_top_p(probs, params)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=probs.device)  # [R]
        threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [R, 1]
        probs = probs.masked_fill(probs < threshold, 0.0)  # the top token is never below it
    return probs


def _top_k_top_p(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """top-k, then top-p over the renormalised top-k distribution, in sorted order: [R, V] -> [R, V]."""
    vocab, device = probs.shape[1], probs.device
    top_k = torch.tensor([min(p.top_k, vocab) or vocab for p in params], device=device)  # [R] (> vocab: all)
    top_p = torch.tensor([p.top_p for p in params], device=device)  # [R]
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [R, V]
    keep = torch.arange(vocab, device=device)[None, :] < top_k[:, None]  # [R, V]
    kept = sorted_probs * keep  # [R, V]
    kept = kept / kept.sum(dim=-1, keepdim=True)  # [R, V] renormalised over top-k
    mass_before = F.pad(kept.cumsum(dim=-1)[:, :-1], (1, 0))  # [R, V] mass of strictly better tokens
    # Keep the smallest prefix reaching top_p; top_p = 1 is "off" (cumsum rounding must not cut the tail).
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep[:, 0] = True
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs * keep)  # [R, V]
