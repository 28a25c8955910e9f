"""When a request stops: end-of-sequence and stop tokens, stop strings (which may span several
tokens and are cut from the text, OpenAI-style), and max_tokens."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from deployments.engine.params import SamplingParams


class FinishReason(enum.Enum):
    STOP = "stop"  # an eos / stop token, or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"


@dataclass(frozen=True)
class StopResult:
    reason: FinishReason
    truncate_to: int | None = None  # cut the text here (a stop string starts at this index)


class StopChecker:
    """Stop tokens are kept in the returned token ids but produce no text (vLLM semantics)."""

    def __init__(self, params: SamplingParams, eos_token_ids: tuple[int, ...]):
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.longest_stop = max((len(s) for s in params.stop), default=0)
        self._searched = 0  # text before this index holds no stop string

    def check(self, token_id: int, text: str, num_generated: int) -> StopResult | None:
        if token_id in self.stop_ids:
            return StopResult(FinishReason.STOP)
        cut = self._find_stop_string(text)
        if cut is not None:
            return StopResult(FinishReason.STOP, cut)
        if num_generated >= self.params.max_tokens:
            return StopResult(FinishReason.LENGTH)
        return None

    def _find_stop_string(self, text: str) -> int | None:
        if not self.longest_stop:
            return None
        start = max(0, self._searched - self.longest_stop + 1)  # a match may straddle old and new text
        hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
        self._searched = len(text)
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """Trailing characters a stream must hold back: they could begin a stop string."""
        for n in range(min(self.longest_stop - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.params.stop):
                return n
        return 0
