"""Token sampling for a batch: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Order (as Hugging Face's warpers and vLLM): temperature, then top-k, then top-p over what top-k
left (renormalised), then min-p (relative to the top token, so renormalising does not change it).
Truncation runs as tensor ops over the whole batch with per-row parameter tensors, built once per
step (`SamplingTensors`, one host-to-device copy); top-k alone ranks only the k best tokens (topk),
the full vocabulary is sorted only for a top-p that no top-k bounds.

The draw is the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. is a sample from p. It
needs no torch.multinomial (no host sync), and a seeded row draws its noise from its own
generator, so its tokens do not depend on what else is in the batch. Only that draw loops (over
seeded sampling rows).
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


@dataclass(frozen=True)
class SamplingTensors:
    """A batch's sampling parameters as device tensors `[R]`, built once per step (one copy)."""

    temperature: torch.Tensor  # greedy rows: 1 (their draw is replaced by the argmax)
    top_k: torch.Tensor  # clamped to the vocabulary; off = vocabulary
    top_p: torch.Tensor  # off = 1
    min_p: torch.Tensor  # off = 0
    max_top_k: int | None  # the largest top-k, when top-k bounds every row a top-p applies to (else None)
    truncates: torch.Tensor | None  # [R] bool: rows with top-k or top-p (None: no row has either)
    any_min_p: bool

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab: int, device: torch.device) -> SamplingTensors:
        top_ks = [min(p.top_k, vocab) or vocab for p in params]
        table = torch.tensor([[1.0 if p.is_greedy else p.temperature, k, p.top_p, p.min_p, bool(p.top_k or p.top_p < 1)]
                              for p, k in zip(params, top_ks, strict=True)])  # [R, 5] host; k <= vocab < 2**24: exact
        temperature, top_k, top_p, min_p, truncates = table.to(device, non_blocking=True).unbind(1)
        any_truncation = any(p.top_k or p.top_p < 1.0 for p in params)
        nucleus_unbounded = any(p.top_p < 1.0 and not p.top_k for p in params)
        with_k = [k for p, k in zip(params, top_ks, strict=True) if p.top_k]
        max_top_k = max(with_k) if with_k and not nucleus_unbounded else None
        return cls(temperature, top_k.long(), top_p, min_p, max_top_k, truncates.bool() if any_truncation else None,
                   any(p.min_p > 0.0 for p in params))


class Sampler:
    """Stateless: all randomness comes from the generators passed in (or the global RNG)."""

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]) -> SampleResult:
        """Pick one token per row of `logits` [B, V].

        `generators[i]` is row i's own generator (seeded requests; on the logits' device) or None
        (the device's global RNG). Greedy rows take the argmax (ties -> lowest id) and draw nothing
        from their own generator.
        """
        if not len(params) == len(generators) == logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} rows of logits, {len(params)} params, {len(generators)} generators")
        logits = logits.float()  # [B, V]
        token_ids = logits.argmax(dim=-1)  # [B]
        greedy = [p.is_greedy for p in params]
        if not all(greedy):
            # every row goes through the sampling math (no gather of the sampling rows); greedy rows keep the argmax
            sampled = sample_rows(logits, params, [None if gr else g for g, gr in zip(generators, greedy, strict=True)])
            if any(greedy):
                is_greedy = torch.tensor(greedy).to(logits.device, non_blocking=True)  # [B]
                sampled = torch.where(is_greedy, token_ids, sampled)
            token_ids = sampled
        logprobs = None
        if any(p.logprobs for p in params):
            chosen = logits.gather(1, token_ids[:, None]).squeeze(1)  # [B]
            logprobs = chosen - logits.logsumexp(dim=-1)  # [B] = log_softmax(logits)[chosen]
        return SampleResult(token_ids, logprobs)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Temperature, truncation and the exponential race for rows that all sample: [R, V] -> [R]."""
    t = SamplingTensors.of(params, logits.shape[1], logits.device)
    probs = torch.softmax(logits / t.temperature[:, None], dim=-1)  # [R, V]
    probs = _truncate(probs, t)
    noise = exponential_noise(probs.shape, generators, probs.device)  # [R, V]
    return (probs / noise).argmax(dim=-1)  # [R]


def exponential_noise(shape: torch.Size, generators: Sequence[torch.Generator | None],
                      device: torch.device) -> torch.Tensor:
    """Exp(1) noise [R, V]: one draw from the global RNG for all rows, then each row i with a
    generator drawn again from generators[i] alone (so a seeded row's noise is independent of the batch)."""
    noise = torch.empty(shape, device=device).exponential_()  # [R, V]
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)  # a contiguous row: same draw as a batch of one
    # Exp(1) can round to 0; p / 0 would be inf (or nan for a dropped token) and win the race.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def truncate(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Zero the tokens top-k, top-p and min-p drop from `probs` [R, V] (not renormalised).

    The most likely token always stays. top-k keeps exactly k tokens (ties broken by sort order).
    """
    return _truncate(probs, SamplingTensors.of(params, probs.shape[1], probs.device))


def _truncate(probs: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    if t.truncates is not None:
        kept = _top_k_top_p(probs, t)
        probs = torch.where(t.truncates[:, None], kept, probs)  # rows without top-k/top-p stay exact
    if t.any_min_p:
        threshold = t.min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [R, 1]
        probs = probs.masked_fill(probs < threshold, 0.0)  # the top token is never below it
    return probs


def _top_k_top_p(probs: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """top-k, then top-p over the renormalised top-k distribution, in sorted order: [R, V] -> [R, V].
    Only the `max_top_k` best tokens are ranked (topk) when top-k bounds every nucleus; else the
    whole vocabulary is sorted."""
    if t.max_top_k is not None:
        sorted_probs, order = probs.topk(t.max_top_k, dim=-1)  # [R, K] descending
    else:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [R, V]
    width = sorted_probs.shape[1]
    keep = torch.arange(width, device=probs.device)[None, :] < t.top_k[:, None]  # [R, K]
    kept = sorted_probs * keep  # [R, K]
    kept = kept / kept.sum(dim=-1, keepdim=True)  # [R, K] renormalised over top-k
    mass_before = F.pad(kept.cumsum(dim=-1)[:, :-1], (1, 0))  # [R, K] mass of strictly better tokens
    # Keep the smallest prefix reaching top_p; top_p = 1 is "off" (cumsum rounding must not cut the tail).
    keep &= (mass_before < t.top_p[:, None]) | (t.top_p[:, None] >= 1.0)
    keep[:, 0] = True
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs * keep)  # [R, V]
