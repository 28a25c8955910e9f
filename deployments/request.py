"""The request every front end (HTTP, gRPC, CLI) turns its input into (it streams back the engine's
`RequestOutput`s). Plain data: it crosses Ray process boundaries."""

from __future__ import annotations

from dataclasses import dataclass

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
