"""Request bodies of the OpenAI-compatible HTTP API (pydantic v2) and their conversion into a
`GenerationRequest`. Pure: no Ray, no I/O; the Ingress calls it.

What is accepted:
- Unknown fields are ignored (`extra="ignore"`): OpenAI clients send fields this server has no use
  for (`metadata`, `store`, `parallel_tool_calls`, a message's `name`, ...).
- Known fields whose meaning Herd cannot honour (n > 1, penalties, top logprobs, logit_bias, tools,
  response_format, echo, suffix, best_of) are rejected unless they hold their "off" value: ignoring
  them would return something other than what the client asked for.
- Scalars are strict: "10" is not an integer and true is not 1 (an int is a float, as in JSON).
- Images come only as base64 `data:` URLs; this server fetches nothing. `detail` is accepted and
  unused (the Llama 4 processor tiles every image the same way).

Every problem ends as one `InvalidInputError` naming the field(s): `decode_body` for the bytes
(size, UTF-8, JSON syntax, nesting, huge integers, lone surrogates), `parse_*_request` for the shape
of the body, `check_prompt_token_ids` for token ids against the vocabulary, `to_generation_request`
for the sampling ranges (via `SamplingParams.create`). None of them echoes a Python exception's text.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from deployments.engine.params import SamplingParams
from deployments.engine.validation import describe_validation_error, encodable
from deployments.request import ChatTurn, GenerationRequest, ImagePart
from model.errors import InvalidInputError

_BODY = ConfigDict(strict=True, extra="ignore", frozen=True)
MAX_INT_DIGITS = 100  # longer JSON integers are rejected (no field needs them; Python's int() refuses > 4300)


class BodyTooLarge(InvalidInputError):
    """The request body exceeds `limits.max_body_bytes` (HTTP 413)."""


class _BadNumber(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _BadNumber(f"the body holds an integer of {len(text.lstrip('-'))} digits; at most {MAX_INT_DIGITS} "
                         "are accepted")
    return int(text)


def _parse_constant(text: str) -> Any:
    raise _BadNumber(f"the body holds {text}, which is not valid JSON")


def check_body_size(size: int, max_bytes: int) -> None:
    """BodyTooLarge if a body of `size` bytes (declared or read so far) exceeds `max_bytes`."""
    if size > max_bytes:
        raise BodyTooLarge(f"the request body is larger than {max_bytes} bytes (limits.max_body_bytes)")


def decode_body(raw: bytes, max_bytes: int) -> Any:
    """The JSON value of a request body, or one InvalidInputError saying what is wrong with it:
    too large (BodyTooLarge), not UTF-8, not JSON, nested too deeply, an integer of more than
    MAX_INT_DIGITS digits, NaN/Infinity, or a string holding a lone surrogate (`"\\ud800"`)."""
    check_body_size(len(raw), max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"the body is not valid UTF-8 (invalid byte at offset {e.start})") from None
    try:
        body = json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)
    except _BadNumber as e:
        raise InvalidInputError(str(e)) from None
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise InvalidInputError("the body is not accepted: its JSON is nested too deeply") from None
    where = _lone_surrogate(body)
    if where is not None:
        raise InvalidInputError(f"{where or 'the body'}: a string holds a lone UTF-16 surrogate (an unpaired "
                                "\\ud800-\\udfff escape), which is not valid Unicode")
    return body


def _lone_surrogate(value: Any) -> str | None:
    """The path (`messages.0.content`) of the first string, key or value, that cannot be encoded as
    UTF-8 (a lone surrogate); None if there is none. Iterative: deep nesting cannot overflow it."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(v, dict):
            for k, item in v.items():
                child = f"{path}.{k}" if path else str(k)
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return path
                stack.append((child, item))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(v))
    return None


def check_prompt_token_ids(ids: list[int], vocab_size: int, field: str = "prompt") -> None:
    """InvalidInputError naming `field` if a token id is outside `[0, vocab_size)` (before any
    tensor is made of them: an id >= 2**63 does not fit one)."""
    for pos, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            shown = str(t) if len(str(t)) <= 24 else f"{str(t)[:12]}...({len(str(t))} digits)"
            raise InvalidInputError(f"invalid request: {field}: token id {shown} at position {pos} is outside the "
                                    f"vocabulary [0, {vocab_size})")


# Every string Herd uses from a body: JSON can carry a lone surrogate ("\udcff") that no later
# .encode() survives (the tenant salt is hashed inside an engine step), so it is a 400 here.
Text = Annotated[str, AfterValidator(encodable)]


def _only(*allowed: Any, message: str) -> AfterValidator:
    """A field Herd accepts only with one of its "off" values; anything else fails with `message`."""
    def check(value: Any) -> Any:
        """Pass an allowed value through; reject anything else."""
        if value not in allowed:
            raise ValueError(message)
        return value
    return AfterValidator(check)


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:` URL (`data:image/png;base64,...`); any other URL is an error."""
    if url[:5].lower() != "data:":
        raise ValueError("only data: URLs are accepted; this server fetches nothing")
    header, comma, payload = url[5:].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ValueError("the data: URL must be base64-encoded: data:<media type>;base64,<data>")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"the data: URL is not valid base64 ({e})") from None
    if not data:
        raise ValueError("the data: URL holds no bytes")
    return data


class ImageURL(BaseModel):
    """`{"url": "data:image/png;base64,...", "detail"?}`; the bytes are decoded once, here."""

    model_config = _BODY
    url: Text
    detail: Literal["auto", "low", "high"] | None = None
    _data: bytes = PrivateAttr(b"")

    @model_validator(mode="after")
    def _decode(self) -> ImageURL:
        """Decode now, so a bad URL fails validation and the conversion reuses the bytes."""
        self._data = decode_data_url(self.url)
        return self

    @property
    def data(self) -> bytes:
        """The decoded image bytes (checked as an image by the Ingress, not here)."""
        return self._data


class ContentPart(BaseModel):
    """One part of a message: `{"type": "text", "text"}` or `{"type": "image_url", "image_url": {"url"}}`."""

    model_config = _BODY
    type: Literal["text", "image_url"]
    text: Text | None = None
    image_url: ImageURL | None = None

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, v: Any) -> Any:
        """Some clients send the URL itself instead of `{"url": ...}`."""
        return {"url": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _has_payload(self) -> ContentPart:
        """The field named by `type` must be present."""
        if self.type == "text" and self.text is None:
            raise ValueError('a "text" part needs a "text" string')
        if self.type == "image_url" and self.image_url is None:
            raise ValueError('an "image_url" part needs "image_url": {"url": "data:<media type>;base64,..."}')
        return self


class ChatMessage(BaseModel):
    """One chat turn; `content` is a string or a list of parts. `developer` is OpenAI's new `system`."""

    model_config = _BODY
    role: Literal["system", "user", "assistant", "developer"]
    content: list[ContentPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_as_part(cls, v: Any) -> Any:
        """A plain string is one text part; anything but a string or a list is an error."""
        if isinstance(v, str):
            return [{"type": "text", "text": v}]
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of content parts")
        return v


class StreamOptions(BaseModel):
    model_config = _BODY
    include_usage: bool = False


_OFF = "is not supported; leave it unset"


class _SamplingRequest(BaseModel):
    """Fields shared by chat and text completions; None means "the SamplingParams default"."""

    model_config = _BODY
    model: Text = ""  # empty: the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # auth off: the tenant unless x-herd-tenant names one; with API keys ignored
    n: Annotated[int | None, _only(None, 1, message="n > 1 is not supported; n must be 1")] = None
    presence_penalty: Annotated[float | None, _only(None, 0, message=f"a non-zero presence_penalty {_OFF}")] = None
    frequency_penalty: Annotated[float | None, _only(None, 0, message=f"a non-zero frequency_penalty {_OFF}")] = None
    logit_bias: Annotated[dict[str, Any] | None, _only(None, {}, message=f"logit_bias {_OFF}")] = None
    # Herd / vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    session_id: Text | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        """OpenAI accepts one stop string or a list of them."""
        return [v] if isinstance(v, str) else v

    def sampling_kwargs(self) -> dict[str, Any]:
        """The set fields SamplingParams knows, for `SamplingParams.create`."""
        names = ("max_tokens", "temperature", "top_p", "seed", "stop", "top_k", "min_p", "ignore_eos", "stop_token_ids")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, _only(None, 0, message="top_logprobs is not supported (only 0): "
                                               "Herd returns the chosen token's logprob only")] = None
    tools: Annotated[list[Any] | None, _only(None, [], message=f"tools (function calling) {_OFF}")] = None
    response_format: Annotated[dict[str, Any] | None, _only(None, {"type": "text"},
                                                            message=f"response_format {_OFF}")] = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        """A chat needs at least one message."""
        if not v:
            raise ValueError("must be a non-empty list of messages")
        return v

    @model_validator(mode="after")
    def _one_max_tokens(self) -> ChatCompletionRequest:
        """max_tokens and max_completion_tokens mean the same; two different values are an error."""
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                             f"({self.max_completion_tokens}) differ; set one of them")
        return self

    def sampling_kwargs(self) -> dict[str, Any]:
        """Shared fields, plus max_completion_tokens (as max_tokens) and logprobs."""
        kwargs = super().sampling_kwargs()
        if self.max_completion_tokens is not None:
            kwargs["max_tokens"] = self.max_completion_tokens
        return kwargs | {"logprobs": bool(self.logprobs)}


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions`: one prompt, as text or as token ids."""

    prompt: str | list[int]  # a str is checked by _one_prompt (Text in a union names the union member)
    logprobs: Annotated[int | None, _only(None, 0, message="logprobs > 0 (top alternatives) is not supported; "
                                          "use 0 for the chosen tokens' logprobs")] = None
    echo: Annotated[bool | None, _only(None, False, message=f"echo=true {_OFF}")] = None
    suffix: Annotated[str | None, _only(None, "", message=f"suffix {_OFF}")] = None
    best_of: Annotated[int | None, _only(None, 1, message="best_of > 1 is not supported; best_of must be 1")] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        """A string or a token-id list, or a list holding exactly one of those (OpenAI's batch form)."""
        if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
            if len(v) != 1:
                raise ValueError(f"one prompt per request: got a list of {len(v)} prompts")
            v = v[0]
        if isinstance(v, str):
            if not v:
                raise ValueError("the prompt is empty")
            return encodable(v)
        if isinstance(v, list) and v and all(type(t) is int for t in v):
            if min(v) < 0:
                raise ValueError(f"token ids must be >= 0, got {min(v)}")
            return v
        raise ValueError("must be a non-empty string or a non-empty list of token ids (integers)")

    def sampling_kwargs(self) -> dict[str, Any]:
        """Shared fields, plus logprobs (0 = the chosen tokens' logprobs)."""
        return super().sampling_kwargs() | {"logprobs": self.logprobs == 0}


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; any problem raises one InvalidInputError naming the fields."""
    return _parse(ChatCompletionRequest, body)


def parse_completion_request(body: Any) -> CompletionRequest:
    """Validate a decoded JSON body; any problem raises one InvalidInputError naming the fields."""
    return _parse(CompletionRequest, body)


def _parse(model: type[BaseModel], body: Any) -> Any:
    """Validate `body` as `model`, turning every pydantic error into one InvalidInputError."""
    if not isinstance(body, dict):
        raise InvalidInputError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise InvalidInputError(f"invalid request: {describe_validation_error(e)}") from None


def to_generation_request(req: ChatCompletionRequest | CompletionRequest, *, request_id: str) -> GenerationRequest:
    """The internal request, without a tenant: the Ingress derives it from the caller's key, the
    `x-herd-tenant` header and `user` (deployments/auth.py `cache_salt`)."""
    common = dict(request_id=request_id, params=SamplingParams.create(**req.sampling_kwargs()), model=req.model,
                  session_id=req.session_id or "")
    if isinstance(req, ChatCompletionRequest):
        return GenerationRequest(messages=[_turn(m) for m in req.messages], **common)
    if isinstance(req.prompt, str):
        return GenerationRequest(text=req.prompt, **common)
    return GenerationRequest(prompt_token_ids=list(req.prompt), **common)


def _turn(message: ChatMessage) -> ChatTurn:
    """A message as a ChatTurn: text parts as strings, images as their decoded bytes, in order."""
    role = "system" if message.role == "developer" else message.role
    return ChatTurn(role, [ImagePart(p.image_url.data) if p.type == "image_url" else p.text for p in message.content])
