"""The request every front end (HTTP, gRPC, CLI) turns its input into, and the deltas it streams
back. Plain data: it crosses Ray process boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field

from deployments.engine.params import SamplingParams


@dataclass(frozen=True)
class ImagePart:
    data: bytes  # encoded image bytes, decoded and checked by the Ingress


@dataclass(frozen=True)
class ChatTurn:
    role: str  # system | user | assistant
    parts: list[str | ImagePart]  # text and images in order


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of `text`, `messages`, `prompt_token_ids` is set."""

    request_id: str
    params: SamplingParams
    text: str | None = None  # completion prompt; BOS is added
    messages: list[ChatTurn] | None = None  # Llama 4 chat format, generation prompt appended
    prompt_token_ids: list[int] | None = None  # used as given
    model: str = ""  # empty: the served model
    session_id: str = ""
    tenant: str = ""


@dataclass(frozen=True)
class GenerationDelta:
    """One streamed step of a request; the last one has `finish_reason` and the usage counts."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache, both tiers
    cached_tokens_redis: int = 0  # of which loaded from the shared Redis tier
    replica: str = ""  # the Router replica that served it (on the finishing delta)
    extra: dict = field(default_factory=dict)
