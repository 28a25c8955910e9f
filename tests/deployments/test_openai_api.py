"""The OpenAI-compatible HTTP layer without Ray: request bodies -> GenerationRequest (every bad
input one InvalidInputError naming the problem), and response dicts that the official `openai`
client types accept."""

from __future__ import annotations

import base64
import io
import json
import re

import openai.types as oai_types
import pytest
from openai._streaming import SSEDecoder
from openai.pagination import SyncPage
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from PIL import Image

from deployments import openai_api as oai
from deployments.engine.output import RequestOutput
from deployments.engine.params import SamplingParams
from deployments.openai_schema import parse_chat_request, parse_completion_request, to_generation_request
from deployments.request import ChatTurn, ImagePart
from model.errors import InvalidInputError

MODEL = "herd-tiny"
CREATED = 1_700_000_000


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 30)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def chat(messages=None, **fields) -> dict:
    return {"model": MODEL, "messages": messages or [{"role": "user", "content": "hi"}], **fields}


def convert(body: dict, chat_api: bool = True):
    parse = oai.parse_chat_request if chat_api else oai.parse_completion_request
    return oai.to_generation_request(parse(body), request_id="req-1")


# ---- requests -----------------------------------------------------------------------------------

def test_chat_text_with_every_sampling_field():
    body = chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "ann"}],
                max_tokens=12, temperature=0.5, top_p=0.9, seed=7, stop="\n", stop_token_ids=[3], top_k=40,
                min_p=0.05, ignore_eos=True, session_id="s-1", user="acme", logprobs=True, top_logprobs=0, n=1,
                presence_penalty=0, frequency_penalty=0.0, stream=True, stream_options={"include_usage": True},
                metadata={"unknown": "ignored"}, store=False)
    parsed = oai.parse_chat_request(body)
    req = oai.to_generation_request(parsed, request_id="req-1")
    assert parsed.stream and parsed.stream_options.include_usage
    assert req.messages == [ChatTurn("system", ["be brief"]), ChatTurn("user", ["hi"])]
    assert req.text is None and req.prompt_token_ids is None
    assert (req.request_id, req.model, req.session_id, req.tenant, parsed.user) == ("req-1", MODEL, "s-1", "", "acme")
    assert req.params == SamplingParams(max_tokens=12, temperature=0.5, top_p=0.9, seed=7, stop=["\n"],
                                        stop_token_ids=[3], top_k=40, min_p=0.05, ignore_eos=True, logprobs=True)


def test_chat_parts_with_a_png_data_url():
    png = png_bytes()
    parts = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": data_url(png), "detail": "high"}},
             {"type": "text", "text": "and this?"},
             {"type": "image_url", "image_url": data_url(png)}]  # bare URL string, as some clients send
    req = convert(chat([{"role": "developer", "content": "sys"}, {"role": "user", "content": parts},
                        {"role": "assistant", "content": [{"type": "text", "text": "a dot"}]}]))
    assert req.messages == [ChatTurn("system", ["sys"]),
                            ChatTurn("user", ["what is this?", ImagePart(png), "and this?", ImagePart(png)]),
                            ChatTurn("assistant", ["a dot"])]
    assert Image.open(io.BytesIO(req.messages[1].parts[1].data)).size == (8, 6)


def test_defaults_and_no_self_asserted_tenant():
    req = convert({"messages": [{"role": "user", "content": "hi"}]})
    assert req.params == SamplingParams() and req.params.max_tokens == 256 and req.params.temperature == 1.0
    assert (req.model, req.tenant, req.session_id) == ("", "", "")
    assert convert(chat(user="from-user")).tenant == ""  # the Ingress decides the tenant (auth), not the body


def test_max_completion_tokens_is_max_tokens():
    assert convert(chat(max_completion_tokens=9)).params.max_tokens == 9
    assert convert(chat(max_completion_tokens=9, max_tokens=9)).params.max_tokens == 9
    with pytest.raises(InvalidInputError, match="max_tokens .* and max_completion_tokens .* differ"):
        convert(chat(max_completion_tokens=9, max_tokens=10))


@pytest.mark.parametrize("prompt, text, ids", [
    ("Once upon", "Once upon", None),
    (["Once upon"], "Once upon", None),  # OpenAI's batch form with one prompt
    ([1, 5, 9], None, [1, 5, 9]),
    ([[1, 5, 9]], None, [1, 5, 9]),
])
def test_completion_prompts(prompt, text, ids):
    req = convert({"model": MODEL, "prompt": prompt, "max_tokens": 4, "seed": 3, "logprobs": 0, "echo": False,
                   "user": "acme", "session_id": "s"}, chat_api=False)
    assert (req.text, req.prompt_token_ids, req.messages) == (text, ids, None)
    assert req.params == SamplingParams(max_tokens=4, seed=3, logprobs=True)
    assert (req.session_id, req.model) == ("s", MODEL)


def test_completion_without_logprobs():
    assert convert({"prompt": "x"}, chat_api=False).params.logprobs is False


IMG = {"type": "image_url", "image_url": {"url": data_url(b"\x89PNG")}}


def with_part(part: dict) -> dict:
    return chat([{"role": "user", "content": [{"type": "text", "text": "look"}, part]}])


BAD_CHAT = [
    ({"model": MODEL}, "messages: field required"),
    (chat(messages=[]) | {"messages": []}, "messages (got []): must be a non-empty list"),
    (chat([{"role": "tool", "content": "x"}]), "messages.0.role (got 'tool'): Input should be 'system'"),
    (chat([{"role": "user"}]), "messages.0.content: field required"),
    (chat([{"role": "user", "content": 5}]), "messages.0.content (got 5): must be a string or a list"),
    (chat([{"role": "user", "content": None}]), "messages.0.content (got None)"),
    (chat(n=2), "n > 1 is not supported"),
    (chat(n=0), "n > 1 is not supported; n must be 1"),
    (with_part({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}),
     "messages.0.content.1.image_url (got {'url': 'https://example.com/cat.png'}): only data: URLs are accepted; "
     "this server fetches nothing"),
    (with_part({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!not base64!!"}}),
     "messages.0.content.1.image_url (got {'url': 'data:image/png;base64,!!not"),
    (with_part({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!not base64!!"}}),
     "not valid base64"),
    (with_part({"type": "image_url", "image_url": {"url": "data:image/png," + "abc"}}), "must be base64-encoded"),
    (with_part({"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}), "holds no bytes"),
    (with_part({"type": "image_url", "image_url": {}}), "messages.0.content.1.image_url.url: field required"),
    (with_part({"type": "image_url"}), 'messages.0.content.1 (got {\'type\': \'image_url\'}): an "image_url" part'),
    (with_part({"type": "text"}), 'a "text" part needs a "text" string'),
    (with_part({"type": "input_audio", "input_audio": {}}), "messages.0.content.1.type (got 'input_audio')"),
    (with_part(IMG | {"image_url": {"url": data_url(b"x"), "detail": "ultra"}}), "image_url.detail (got 'ultra')"),
    (chat(max_tokens="ten"), "max_tokens (got 'ten'): Input should be a valid integer"),
    (chat(max_tokens=True), "max_tokens (got True): Input should be a valid integer"),
    (chat(temperature="hot"), "temperature (got 'hot'): Input should be a valid number"),
    (chat() | {"messages": "hello"}, "messages (got 'hello'): Input should be a valid list"),
    (chat(top_logprobs=3), "top_logprobs is not supported (only 0)"),
    (chat(presence_penalty=0.5), "presence_penalty (got 0.5): a non-zero presence_penalty is not supported"),
    (chat(frequency_penalty=-1), "a non-zero frequency_penalty is not supported"),
    (chat(logit_bias={"5": 10}), "logit_bias is not supported"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools (function calling) is not supported"),
    (chat(response_format={"type": "json_object"}), "response_format is not supported"),
    (chat(stop=["a", 3]), "stop.1 (got 3): Input should be a valid string"),
    (chat(stream="yes"), "stream (got 'yes'): Input should be a valid boolean"),
    (chat(stream_options={"include_usage": "y"}), "stream_options.include_usage"),
]


@pytest.mark.parametrize("body, expected", BAD_CHAT)
def test_bad_chat_requests(body, expected):
    with pytest.raises(InvalidInputError) as info:
        oai.parse_chat_request(body)
    assert expected in str(info.value)
    assert str(info.value).startswith("invalid request: ")


BAD_COMPLETION = [
    ({"model": MODEL}, "prompt: field required"),
    ({"prompt": ["a", "b"]}, "one prompt per request: got a list of 2 prompts"),
    ({"prompt": [[1], [2]]}, "one prompt per request: got a list of 2 prompts"),
    ({"prompt": [1, "a"]}, "prompt (got [1, 'a']): must be a non-empty string or a non-empty list of token ids"),
    ({"prompt": [1, 2.0]}, "list of token ids"),
    ({"prompt": [1, True]}, "list of token ids"),
    ({"prompt": [1, -4]}, "token ids must be >= 0, got -4"),
    ({"prompt": []}, "prompt (got [])"),
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": 7}, "prompt (got 7)"),
    ({"prompt": "x", "echo": True}, "echo (got True): echo=true is not supported"),
    ({"prompt": "x", "suffix": "end"}, "suffix is not supported"),
    ({"prompt": "x", "logprobs": 2}, "logprobs > 0 (top alternatives) is not supported"),
    ({"prompt": "x", "best_of": 3}, "best_of > 1 is not supported"),
    ({"prompt": "x", "n": 2}, "n > 1 is not supported"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens (got 'ten')"),
]


@pytest.mark.parametrize("body, expected", BAD_COMPLETION)
def test_bad_completion_requests(body, expected):
    with pytest.raises(InvalidInputError) as info:
        oai.parse_completion_request(body)
    assert expected in str(info.value)


@pytest.mark.parametrize("fields, expected", [
    ({"max_tokens": -1}, "max_tokens (got -1): Input should be greater than or equal to 1"),
    ({"max_completion_tokens": 0}, "max_tokens (got 0)"),
    ({"temperature": -1}, "temperature (got -1.0): Input should be greater than or equal to 0"),
    ({"top_p": 0}, "top_p (got 0.0)"),
    ({"top_k": -2}, "top_k (got -2)"),
    ({"seed": -1}, "seed (got -1)"),
    ({"stop": [""]}, "stop strings must be non-empty"),
    ({"stop_token_ids": [-1]}, "token ids must be >= 0"),
])
def test_bad_sampling_values(fields, expected):
    """Ranges are SamplingParams' to check; they surface from to_generation_request."""
    with pytest.raises(InvalidInputError, match="invalid sampling parameters") as info:
        convert(chat(**fields))
    assert expected in str(info.value)


def test_many_problems_in_one_message_and_a_non_object_body():
    with pytest.raises(InvalidInputError) as info:
        oai.parse_chat_request(chat(max_tokens="ten", n=3, stream=1))
    assert all(s in str(info.value) for s in ("max_tokens (got 'ten')", "n (got 3)", "stream (got 1)"))
    with pytest.raises(InvalidInputError, match="the request body must be a JSON object, got list"):
        oai.parse_chat_request([1, 2])


# ---- responses ----------------------------------------------------------------------------------

def stream_of(logprobs: bool = False) -> list[RequestOutput]:
    lp = (lambda x: [x]) if logprobs else (lambda x: None)
    return [RequestOutput("chatcmpl-abc", [10], "Hel", lp(-0.5)),
            RequestOutput("chatcmpl-abc", [11], "lo ✓", lp(-1.25)),
            RequestOutput("chatcmpl-abc", [2], "", lp(-0.01), finish_reason="stop", num_prompt_tokens=7,
                            num_generated_tokens=3, num_cached_tokens=4)]


TOKENS = {10: "Hel", 11: "lo ✓", 2: "<|eot|>"}


def test_chat_completion_matches_the_openai_type():
    d = oai.chat_completion("chatcmpl-abc", MODEL, stream_of(), created=CREATED)
    assert set(d) == {"id", "object", "created", "model", "choices", "usage"}
    c = ChatCompletion.model_validate(d)
    assert (c.id, c.object, c.created, c.model) == ("chatcmpl-abc", "chat.completion", CREATED, MODEL)
    assert (c.choices[0].message.role, c.choices[0].message.content) == ("assistant", "Hello ✓")
    assert (c.choices[0].index, c.choices[0].finish_reason, c.choices[0].logprobs) == (0, "stop", None)
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (7, 3, 10)
    assert c.usage.prompt_tokens_details.cached_tokens == 4
    assert oai.chat_completion("abc", MODEL, stream_of())["id"] == "chatcmpl-abc"  # the prefix, once
    assert isinstance(oai.chat_completion("abc", MODEL, stream_of())["created"], int)


def test_chat_logprobs_with_and_without_token_text():
    c = ChatCompletion.model_validate(oai.chat_completion("x", MODEL, stream_of(True), TOKENS.get))
    content = c.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.top_logprobs) for t in content] == [
        ("Hel", -0.5, []), ("lo ✓", -1.25, []), ("<|eot|>", -0.01, [])]
    assert content[1].bytes == list("lo ✓".encode())
    fallback = oai.chat_completion("x", MODEL, stream_of(True))["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in fallback] == ["Hel", "lo ✓", ""]  # one token per delta: the delta's text
    two = RequestOutput("x", [10, 11], "Hello ✓", [-0.5, -1.0], "length", 1, 2)
    assert [t["token"] for t in oai.chat_completion("x", MODEL, [two])["choices"][0]["logprobs"]["content"]] == [
        "token_id:10", "token_id:11"]


def test_chat_stream_chunks_match_the_openai_type():
    deltas = stream_of(True)
    chunks = [oai.chat_chunk("chatcmpl-abc", MODEL, d, i == 0, CREATED, TOKENS.get) for i, d in enumerate(deltas)]
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert all((p.id, p.object, p.created, p.model) == ("chatcmpl-abc", "chat.completion.chunk", CREATED, MODEL)
               for p in parsed)
    assert [p.choices[0].delta.role for p in parsed] == ["assistant", None, None]
    assert "role" not in chunks[1]["choices"][0]["delta"]
    assert "".join(p.choices[0].delta.content for p in parsed) == "Hello ✓"
    assert [p.choices[0].finish_reason for p in parsed] == [None, None, "stop"]
    assert parsed[1].choices[0].logprobs.content[0].token == "lo ✓"
    assert oai.chat_chunk("chatcmpl-abc", MODEL, stream_of()[0], True, CREATED)["choices"][0]["logprobs"] is None
    u = ChatCompletionChunk.model_validate(oai.usage_chunk("chatcmpl-abc", MODEL, deltas[-1], CREATED))
    assert u.choices == [] and (u.usage.total_tokens, u.usage.prompt_tokens_details.cached_tokens) == (10, 4)


def test_completion_matches_the_openai_type():
    deltas = [RequestOutput("cmpl-1", [10], "Hel", [-0.5]),
              RequestOutput("cmpl-1", [11], "lo", [-1.5], "length", 5, 2, 0)]
    d = oai.completion("cmpl-1", MODEL, deltas, {10: "Hel", 11: "lo"}.get, created=CREATED)
    c = oai_types.Completion.model_validate(d)
    assert (c.id, c.object, c.created, c.model) == ("cmpl-1", "text_completion", CREATED, MODEL)
    assert (c.choices[0].text, c.choices[0].finish_reason, c.choices[0].index) == ("Hello", "length", 0)
    lp = c.choices[0].logprobs
    assert (lp.tokens, lp.token_logprobs, lp.text_offset) == (["Hel", "lo"], [-0.5, -1.5], [0, 3])
    assert (c.usage.total_tokens, c.usage.prompt_tokens_details.cached_tokens) == (7, 0)
    assert oai.completion("1", MODEL, deltas[-1:])["id"] == "cmpl-1"
    assert oai.completion("1", MODEL, [RequestOutput("1", [2], "", None, "stop")])["choices"][0]["logprobs"] is None


def test_completion_stream_chunks():
    deltas = [RequestOutput("cmpl-1", [10], "Hel"), RequestOutput("cmpl-1", [11], "lo", None, "stop", 5, 2, 1)]
    chunks = [oai.completion_chunk("cmpl-1", MODEL, d, i == 0, CREATED) for i, d in enumerate(deltas)]
    assert chunks[0]["choices"] == [{"index": 0, "text": "Hel", "finish_reason": None, "logprobs": None}]
    last = oai_types.Completion.model_validate(chunks[1])  # the finishing chunk has a finish_reason
    assert (last.object, last.choices[0].text, last.choices[0].finish_reason) == ("text_completion", "lo", "stop")
    u = oai_types.Completion.model_validate(oai.usage_chunk("cmpl-1", MODEL, deltas[-1], CREATED, chat=False))
    assert u.choices == [] and u.usage.prompt_tokens_details.cached_tokens == 1 and u.object == "text_completion"


def test_sse_framing_is_exact_and_the_openai_decoder_reads_it():
    assert oai.sse({"a": "x\n\ny", "b": 1}) == b'data: {"a":"x\\n\\ny","b":1}\n\n'
    assert oai.sse({"t": "✓"}) == 'data: {"t":"✓"}\n\n'.encode()
    assert oai.SSE_DONE == b"data: [DONE]\n\n"
    chunks = [oai.chat_chunk("chatcmpl-abc", MODEL, d, i == 0, CREATED) for i, d in enumerate(stream_of())]
    wire = b"".join(oai.sse(c) for c in chunks) + oai.SSE_DONE
    events = list(SSEDecoder().iter_bytes(iter([wire[:17], wire[17:]])))
    assert [e.data for e in events[:-1]] == [json.dumps(c, separators=(",", ":"), ensure_ascii=False) for c in chunks]
    assert events[-1].data == "[DONE]"
    assert [ChatCompletionChunk.model_validate(e.json()).choices[0].delta.content for e in events[:-1]] == [
        "Hel", "lo ✓", ""]


def test_error_body_and_models_list():
    assert oai.error_body("bad n", "invalid_request_error", 400) == {
        "error": {"message": "bad n", "type": "invalid_request_error", "param": None, "code": 400}}
    d = oai.models_list(["herd-tiny", "herd-big"], created=CREATED)
    page = SyncPage[oai_types.Model].model_validate(d)
    assert page.object == "list" and [m.id for m in page.data] == ["herd-tiny", "herd-big"]
    assert all((m.object, m.created, m.owned_by) == ("model", CREATED, "herd") for m in page.data)


@pytest.mark.parametrize("raw, field", [
    ('{"messages": [{"role": "user", "content": "hi"}], "user": "\\udcff"}', "user"),
    ('{"messages": [{"role": "user", "content": "h\\udcffi"}]}', "messages.0.content.0.text"),
    ('{"messages": [{"role": "user", "content": "hi"}], "session_id": "\\ud800"}', "session_id"),
    ('{"messages": [{"role": "user", "content": "hi"}], "stop": "\\udcff"}', "stop.0"),
    ('{"messages": [{"role": "user", "content": "hi"}], "model": "\\udcff"}', "model"),
    ('{"prompt": "x\\udcff"}', "prompt"),
])
def test_lone_surrogates_are_rejected_naming_the_field(raw, field):
    """JSON escapes can spell strings that are not encodable text; every one Herd uses is refused."""
    body = json.loads(raw)
    parse = parse_chat_request if "messages" in body else parse_completion_request
    with pytest.raises(InvalidInputError, match=rf"{re.escape(field)} \(got .*\): is not valid Unicode text"):
        parse(body)


@pytest.mark.parametrize("extra, field", [
    ({"top_k": 2**63}, "top_k"), ({"seed": 2**64}, "seed"), ({"max_tokens": 2**63}, "max_tokens"),
    ({"stop_token_ids": [2**63]}, "stop_token_ids"),
])
def test_huge_integers_are_rejected_naming_the_field(extra, field):
    req = parse_completion_request({"prompt": "hi", **extra})
    with pytest.raises(InvalidInputError, match=rf"\b{field} \(got"):
        to_generation_request(req, request_id="x")
