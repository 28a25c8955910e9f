"""The OpenAI-compatible HTTP API, without Ray: request parsing (re-exported from
`deployments/openai_schema.py`) and the response bodies, as plain JSON-ready dicts in OpenAI's
exact shapes (checked against the official `openai` client types in the tests).

Token strings in `logprobs`: pass `token_text` (token id -> its text) for exact ones. Without it, a
delta holding one token uses the delta's text as that token's string (the detokenizer may hold back
an incomplete UTF-8 character, so this is close, not exact), and a delta holding several tokens
names them `token_id:<id>` (vLLM's spelling).

`finish_reason` is passed through: "stop" | "length", or the engine's "abort" for a request the
client cancelled (which no client then reads).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from deployments.engine.output import RequestOutput
from deployments.openai_schema import (
    BodyTooLarge,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    ImageURL,
    StreamOptions,
    check_body_size,
    check_prompt_token_ids,
    decode_body,
    decode_data_url,
    parse_chat_request,
    parse_completion_request,
    to_generation_request,
)

__all__ = [
    "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ContentPart", "ImageURL", "StreamOptions",
    "BodyTooLarge", "check_body_size", "check_prompt_token_ids", "decode_body",
    "decode_data_url", "parse_chat_request", "parse_completion_request", "to_generation_request",
    "chat_completion", "chat_chunk", "completion", "completion_chunk", "usage_chunk", "usage",
    "sse", "SSE_DONE", "error_body", "models_list", "CHAT_ID_PREFIX", "COMPLETION_ID_PREFIX",
]

CHAT_ID_PREFIX = "chatcmpl-"
COMPLETION_ID_PREFIX = "cmpl-"
SSE_DONE = b"data: [DONE]\n\n"
TokenText = Callable[[int], str]


def _response_id(prefix: str, request_id: str) -> str:
    """OpenAI's id: the request id with its prefix, added only if the request id lacks it."""
    return request_id if request_id.startswith(prefix) else prefix + request_id


def _last(request_id: str, deltas: list[RequestOutput]) -> RequestOutput:
    """The finishing delta (it carries the finish reason and usage); an empty one if there is none."""
    return deltas[-1] if deltas else RequestOutput(request_id, [], "")


def usage(delta: RequestOutput) -> dict:
    """OpenAI `usage` from a finishing output; `cached_tokens` are the prompt tokens served from cache.
    Herd's extension `herd` says which router-service replica served it and how many cached tokens
    came from the shared prefix cache."""
    return {"prompt_tokens": delta.num_prompt_tokens, "completion_tokens": delta.num_generated_tokens,
            "total_tokens": delta.num_prompt_tokens + delta.num_generated_tokens,
            "prompt_tokens_details": {"cached_tokens": delta.num_cached_tokens},
            "herd": {"replica": delta.replica, "cached_tokens_shared": delta.num_cached_tokens_shared}}


def _token_strings(delta: RequestOutput, token_text: TokenText | None) -> list[str]:
    """The string of each of the delta's tokens (see the module docstring for the fallback)."""
    if token_text is not None:
        return [token_text(t) for t in delta.token_ids]
    if len(delta.token_ids) == 1:
        return [delta.text]
    return [f"token_id:{t}" for t in delta.token_ids]


def _scored_tokens(deltas: list[RequestOutput], token_text: TokenText | None) -> list[tuple[str, float]] | None:
    """(token string, logprob) for every generated token; None when no logprobs were asked for."""
    if all(d.logprobs is None for d in deltas):
        return None
    return [pair for d in deltas for pair in zip(_token_strings(d, token_text), d.logprobs or [], strict=False)]


def _chat_logprobs(deltas: list[RequestOutput], token_text: TokenText | None) -> dict | None:
    """Chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: []}, ...]}."""
    scored = _scored_tokens(deltas, token_text)
    if scored is None:
        return None
    return {"content": [{"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")), "top_logprobs": []}
                        for tok, lp in scored]}


def _completion_logprobs(deltas: list[RequestOutput], token_text: TokenText | None,
                         with_offsets: bool) -> dict | None:
    """Completions `logprobs`: parallel lists; `text_offset` only for a whole (non-streamed) text."""
    scored = _scored_tokens(deltas, token_text)
    if scored is None:
        return None
    offsets, at = [], 0
    for tok, _ in scored:
        offsets.append(at)
        at += len(tok)
    return {"tokens": [tok for tok, _ in scored], "token_logprobs": [lp for _, lp in scored],
            "top_logprobs": None, "text_offset": offsets if with_offsets else None}


def _envelope(prefix: str, request_id: str, object_: str, model: str, created: int | None) -> dict:
    """The fields every response object starts with; `created` defaults to now (Unix seconds)."""
    return {"id": _response_id(prefix, request_id), "object": object_,
            "created": int(time.time()) if created is None else created, "model": model}


def chat_completion(request_id: str, model: str, deltas: list[RequestOutput], token_text: TokenText | None = None,
                    *, created: int | None = None) -> dict:
    """A non-streamed `chat.completion`: the deltas' text joined, usage from the last delta."""
    last = _last(request_id, deltas)
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
              "finish_reason": last.finish_reason, "logprobs": _chat_logprobs(deltas, token_text)}
    return _envelope(CHAT_ID_PREFIX, request_id, "chat.completion", model, created) | {
        "choices": [choice], "usage": usage(last)}


def chat_chunk(request_id: str, model: str, delta: RequestOutput, first: bool, created: int,
               token_text: TokenText | None = None) -> dict:
    """One `chat.completion.chunk`: the first carries role "assistant", the finishing one finish_reason."""
    content = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
    choice = {"index": 0, "delta": content, "finish_reason": delta.finish_reason,
              "logprobs": _chat_logprobs([delta], token_text)}
    return _envelope(CHAT_ID_PREFIX, request_id, "chat.completion.chunk", model, created) | {"choices": [choice]}


def completion(request_id: str, model: str, deltas: list[RequestOutput], token_text: TokenText | None = None,
               *, created: int | None = None) -> dict:
    """A non-streamed `text_completion`: the deltas' text joined, usage from the last delta."""
    last = _last(request_id, deltas)
    choice = {"index": 0, "text": "".join(d.text for d in deltas), "finish_reason": last.finish_reason,
              "logprobs": _completion_logprobs(deltas, token_text, with_offsets=True)}
    return _envelope(COMPLETION_ID_PREFIX, request_id, "text_completion", model, created) | {
        "choices": [choice], "usage": usage(last)}


def completion_chunk(request_id: str, model: str, delta: RequestOutput, first: bool, created: int,
                     token_text: TokenText | None = None) -> dict:
    """One streamed `text_completion`; `first` is unused (same signature as `chat_chunk`)."""
    del first
    choice = {"index": 0, "text": delta.text, "finish_reason": delta.finish_reason,
              "logprobs": _completion_logprobs([delta], token_text, with_offsets=False)}
    return _envelope(COMPLETION_ID_PREFIX, request_id, "text_completion", model, created) | {"choices": [choice]}


def usage_chunk(request_id: str, model: str, delta: RequestOutput, created: int, chat: bool = True) -> dict:
    """The extra last chunk that `stream_options.include_usage` asks for: no choices, the usage."""
    prefix, object_ = (CHAT_ID_PREFIX, "chat.completion.chunk") if chat else (COMPLETION_ID_PREFIX, "text_completion")
    return _envelope(prefix, request_id, object_, model, created) | {"choices": [], "usage": usage(delta)}


def sse(obj: dict) -> bytes:
    """One server-sent event. Compact JSON escapes newlines, so the event is one `data:` line."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n\n"


def error_body(message: str, type_: str, code: int) -> dict:
    """OpenAI's error shape; `code` is the HTTP status."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def models_list(model_ids: list[str], created: int, precision: dict[str, str] | None = None) -> dict:
    """`GET /v1/models`. `precision` (`HerdConfig.served_precision`: weights and routed experts) is
    added to each model object when given (OpenAI clients ignore fields they do not know)."""
    extra = {"precision": precision} if precision is not None else {}
    return {"object": "list",
            "data": [{"id": m, "object": "model", "created": created, "owned_by": "herd", **extra}
                     for m in model_ids]}
