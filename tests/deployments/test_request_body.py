"""Hostile HTTP bodies end as one InvalidInputError (HTTP 400; 413 for a body that is too large)
naming the problem, and never as an internal error or a Python exception's text."""

from __future__ import annotations

import json

import pytest

from deployments import openai_api as oai
from deployments.errors import classify
from model.errors import InvalidInputError

LIMIT = 1 << 20
CHAT = b'{"messages": [{"role": "user", "content": "hi"}], '


def chat(raw: bytes):
    return oai.parse_chat_request(oai.decode_body(raw, LIMIT))


@pytest.mark.parametrize("raw, fragment", [
    (b'{"messages": [{"role": "user", "content": "\xff"}]}', "not valid UTF-8 (invalid byte at offset 43)"),
    (b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "not valid UTF-8"),  # an encoded surrogate
    (CHAT + b'"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (CHAT + b'"seed": ' + b"7" * 5000 + b"}", "an integer of 5000 digits"),
    (CHAT + b'"metadata": -' + b"7" * 5000 + b"}", "an integer of 5000 digits"),
    (CHAT + b'"temperature": NaN}', "NaN"),
    (CHAT + b'"temperature": -Infinity}', "-Infinity"),
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content: a string holds a lone"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages.0.content.0.text: a string holds a lone"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}', "the body: a string holds a lone"),
    (b'{"messages": [', "not valid JSON: Expecting value at line 1 column 15"),
    (b"", "not valid JSON"),
])
def test_malformed_bodies_are_invalid_input(raw, fragment):
    with pytest.raises(InvalidInputError) as info:
        chat(raw)
    err = classify(info.value)
    assert err.http_status == 400 and err.type == "invalid_request_error"
    assert fragment in err.message
    assert "Traceback" not in err.message and "Exceeds the limit" not in err.message


def test_a_lone_surrogate_in_a_completion_prompt():
    with pytest.raises(InvalidInputError, match="prompt: a string holds a lone"):
        oai.decode_body(b'{"prompt": "x\\udbff"}', LIMIT)


def test_valid_surrogate_pairs_and_unicode_pass():
    req = chat(b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00 \xc3\xa9"}], "seed": 12345678901234567890}')
    assert req.messages[0].content[0].text == "\U0001F600 \u00e9" and req.seed == 12345678901234567890


def test_a_body_over_the_limit_is_413():
    raw = json.dumps({"messages": [{"role": "user", "content": "x" * 200}]}).encode()
    assert oai.decode_body(raw, len(raw)) is not None  # exactly at the limit is fine
    with pytest.raises(oai.BodyTooLarge) as info:
        oai.decode_body(raw, len(raw) - 1)
    err = classify(info.value)
    assert err.http_status == 413 and "limits.max_body_bytes" in err.message
    with pytest.raises(oai.BodyTooLarge):
        oai.check_body_size(2 * 2**30, 32 * 2**20)  # a declared 2 GiB body is refused before reading


@pytest.mark.parametrize("ids, fragment", [
    ([1, 2**63], "prompt: token id 9223372036854775808 at position 1 is outside the vocabulary [0, 1000)"),
    ([10**40], "token id 100000000000...(41 digits) at position 0"),
    ([5, 1000], "token id 1000 at position 1"),
])
def test_prompt_token_ids_outside_the_vocabulary(ids, fragment):
    req = oai.parse_completion_request(oai.decode_body(json.dumps({"prompt": ids}).encode(), LIMIT))
    with pytest.raises(InvalidInputError) as info:
        oai.check_prompt_token_ids(req.prompt, 1000)
    assert fragment in str(info.value) and classify(info.value).http_status == 400
    oai.check_prompt_token_ids([0, 999], 1000)
