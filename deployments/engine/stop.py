"""When a request stops: end-of-sequence and stop tokens, stop strings (which may span several
tokens and are cut from the text, OpenAI-style), and max_tokens.

Token semantics (vLLM's): a stop token (an EOS id unless ignore_eos, or any of stop_token_ids) IS
part of the returned token ids but NOT of the returned text. A stop string is not part of the
returned text either; the tokens that produced it stay in the token ids.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from deployments.engine.params import SamplingParams


class FinishReason(enum.Enum):
    """Why a request finished; the value is the OpenAI `finish_reason` string."""

    STOP = "stop"  # an eos / stop token, or a stop string
    LENGTH = "length"  # max_tokens (or, decided by the engine, the model's context)
    ABORT = "abort"  # cancelled by the client (set by the engine, never by StopChecker)


@dataclass(frozen=True)
class StopResult:
    """A finished request: why, and where to cut the text (None: keep all of it)."""

    reason: FinishReason
    truncate_to: int | None = None  # keep text[:truncate_to]: a stop string or the stop token's text starts here


class StopChecker:
    """Stop conditions of one request. Call `check` once per generated token, in order."""

    def __init__(self, params: SamplingParams, eos_token_ids: tuple[int, ...]):
        """`eos_token_ids` come from the checkpoint's tokenizer; they stop unless params.ignore_eos."""
        self.params = params
        eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids) | eos
        self.max_stop_len = max((len(s) for s in params.stop), default=0)
        self._text_len = 0  # len(text) at the previous check: text before it holds no stop string

    def check(self, token_id: int, text: str, num_generated: int) -> StopResult | None:
        """Has the request finished with `token_id`? None if not.

        `text` is all the generated text so far, including `token_id`'s own (if any);
        `num_generated` counts the generated tokens, `token_id` included. A stop string wins over
        max_tokens in the same step; with a stop token the text is cut before the token's text.
        """
        before, self._text_len = min(self._text_len, len(text)), len(text)
        hit = self._find_stop_string(text, before)
        if token_id in self.stop_token_ids:
            cut = before if hit is None else min(hit, before)
            return StopResult(FinishReason.STOP, None if cut == len(text) else cut)
        if hit is not None:
            return StopResult(FinishReason.STOP, hit)
        if num_generated >= self.params.max_tokens:
            return StopResult(FinishReason.LENGTH)
        return None

    def _find_stop_string(self, text: str, before: int) -> int | None:
        """Start of the first stop string that ends in the new text `text[before:]`, or None.

        Only the tail can hold a new match: the new characters plus max_stop_len - 1 before them.
        """
        if not self.max_stop_len:
            return None
        start = max(0, before - self.max_stop_len + 1)
        hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """How many trailing characters of `text` a stream must not send yet: the longest suffix
        that is the beginning of a stop string (and could be cut when the next token arrives)."""
        for n in range(min(self.max_stop_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.params.stop):
                return n
        return 0
