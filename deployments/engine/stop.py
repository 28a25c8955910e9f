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
    """Stop conditions of one request. Call `check` once per generated token, in order.

    Stop strings are matched incrementally (Knuth-Morris-Pratt, one automaton per stop string):
    each call scans only the characters added since the previous one, so a token costs the same
    whatever the stop strings' length (the old search re-read the last max_stop_len characters
    against every prefix of every stop string: quadratic, ~30 ms per token at 40k characters,
    paid by the whole batch). The automatons' states are also the holdback."""

    def __init__(self, params: SamplingParams, eos_token_ids: tuple[int, ...]):
        """`eos_token_ids` come from the checkpoint's tokenizer; they stop unless params.ignore_eos."""
        self.params = params
        eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids) | eos
        self.max_stop_len = max((len(s) for s in params.stop), default=0)
        self._matchers = [StreamMatcher(s) for s in params.stop]
        self._text = ""  # the text the matchers have read (texts only grow between calls)
        self._text_len = 0  # len(text) at the previous check: text before it holds no stop string

    def check(self, token_id: int, text: str, num_generated: int) -> StopResult | None:
        """Has the request finished with `token_id`? None if not.

        `text` is all the generated text so far, including `token_id`'s own (if any);
        `num_generated` counts the generated tokens, `token_id` included. A stop string wins over
        max_tokens in the same step; with a stop token the text is cut before the token's text.
        """
        before, self._text_len = min(self._text_len, len(text)), len(text)
        hit = self._scan(text)
        if token_id in self.stop_token_ids:
            cut = before if hit is None else min(hit, before)
            return StopResult(FinishReason.STOP, None if cut == len(text) else cut)
        if hit is not None:
            return StopResult(FinishReason.STOP, hit)
        if num_generated >= self.params.max_tokens:
            return StopResult(FinishReason.LENGTH)
        return None

    def _scan(self, text: str) -> int | None:
        """Bring the matchers up to `text`; the start of the first stop string that ends in the
        characters read now, or None. A text that does not continue the last one is read afresh."""
        if not self._matchers:
            return None
        start = len(self._text)
        if not text.startswith(self._text):  # not a continuation (never in the engine): start over
            for m in self._matchers:
                m.state = 0
            start = 0
        self._text = text
        hits = [h for h in (m.feed(text, start) for m in self._matchers) if h is not None]
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """How many trailing characters of `text` a stream must not send yet: the longest suffix
        that is the beginning of a stop string (and could be cut when the next token arrives)."""
        self._scan(text)
        return max((m.state for m in self._matchers), default=0)


class StreamMatcher:
    """Knuth-Morris-Pratt over a growing text. `state` is the length of the longest suffix of the
    text read so far that is a proper prefix of `pattern`."""

    def __init__(self, pattern: str):
        if not pattern:
            raise ValueError("a stop string must be non-empty")
        self.pattern = pattern
        self.state = 0
        # fail[i]: length of the longest proper prefix of pattern[:i + 1] that is also its suffix
        self.fail = [0] * len(pattern)
        k = 0
        for i in range(1, len(pattern)):
            while k and pattern[i] != pattern[k]:
                k = self.fail[k - 1]
            if pattern[i] == pattern[k]:
                k += 1
            self.fail[i] = k

    def feed(self, text: str, start: int) -> int | None:
        """Read `text[start:]`; the start index of the first whole match ending there, or None."""
        pattern, fail, k, m = self.pattern, self.fail, self.state, len(self.pattern)
        first = None
        for i in range(start, len(text)):
            c = text[i]
            while k and pattern[k] != c:
                k = fail[k - 1]
            if pattern[k] == c:
                k += 1
            if k == m:
                if first is None:
                    first = i - m + 1
                k = fail[k - 1]
        self.state = k
        return first
