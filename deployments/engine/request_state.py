"""Per-request output state: incremental detokenization, stop conditions, and the deltas a
streaming client receives (text held back while it could still be the start of a stop string)."""

from __future__ import annotations

from deployments.engine.output import RequestOutput
from deployments.engine.sequence import Sequence
from deployments.engine.stop import FinishReason, StopChecker
from model.tokenizer import IncrementalDetokenizer, Tokenizer


class RequestState:
    def __init__(self, seq: Sequence, tokenizer: Tokenizer, max_model_len: int, eos_ids: tuple[int, ...]):
        self.seq = seq
        self.max_model_len = max_model_len
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        assert seq.params is not None  # Engine.add_request always sets them
        self.stop = StopChecker(seq.params, eos_ids)
        self.text = ""
        self.emitted = 0

    def append(self, token_id: int, logprob: float | None) -> RequestOutput:
        """Add a sampled token; returns the delta to stream."""
        seq = self.seq
        seq.append_token(token_id)
        self.text += self.detok.push(token_id)
        result = self.stop.check(token_id, self.text, seq.num_generated)
        reason = result.reason if result is not None else None
        if reason is None and seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            if result is not None and result.truncate_to is not None:
                self.text = self.text[: result.truncate_to]
            else:
                self.text += self.detok.flush()
            visible = len(self.text)
        else:
            visible = len(self.text) - self.stop.holdback(self.text)
        delta = self.text[self.emitted : max(visible, self.emitted)]
        self.emitted += len(delta)
        return RequestOutput(
            seq.request_id, [token_id], delta, logprobs=None if logprob is None else [logprob],
            finish_reason=reason.value if reason else None, num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_generated, num_cached_tokens=seq.num_cached_prompt_tokens,
            num_cached_tokens_shared=seq.transfer.num_cached_tokens_shared if seq.transfer else 0,
        )
