"""`RequestOutput`: what one engine step produced for one request. The same object streams from the
engine through the router service and the ingress to clients (plain data: it crosses Ray process
boundaries); the last one of a request has `finish_reason` and the final counts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    token_ids: list[int]  # new token ids (a stop token is included)
    text: str  # new text (stop strings and special tokens excluded)
    logprobs: list[float] | None = None  # log p of each new token, when asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" on the last output, else None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache, both tiers
    num_cached_tokens_shared: int = 0  # of num_cached_tokens, loaded from the shared prefix cache
    replica: str = ""  # the router-service replica that served it (set on the last output)
    error: str | None = None  # with finish_reason "error": why the engine stopped this request alone

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
