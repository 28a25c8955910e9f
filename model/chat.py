"""The Llama 4 chat format, rendered in plain Python (no jinja).

`render_chat` produces exactly the text transformers' Llama 4 chat template produces (without
custom tools) for valid messages. Where the template would silently drop or garble content, this
module is stricter: unknown roles, part types and misplaced system messages raise
InvalidInputError; a system message given as parts joins all its text parts (the template keeps
only the first); `None` content renders as empty; an empty `tool_calls` list counts as none.

`encode_chat` tokenizes the same prompt safely: the template's own special tokens become special
ids, while message text is encoded with special-token recognition off, so a user who types
`<|eot|>` or `<|image|>` cannot forge turns or image placeholders.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from model.errors import InvalidInputError

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool", "ipython")

Piece = tuple[str, bool]  # (text, is a special token of the template)


def _fail(index: int, what: str) -> InvalidInputError:
    return InvalidInputError(f"messages[{index}]: {what}")


def _parts(index: int, content: Any, *, images: bool = True) -> list[Piece]:
    """Pieces of a message's content: a str, a list of text/image parts, or None."""
    if content is None:
        return []
    if isinstance(content, str):
        return [(content, False)]
    if not isinstance(content, Sequence):
        raise _fail(index, f"content must be a string or a list of parts, got {type(content).__name__}")
    pieces: list[Piece] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append((part["text"], False))
        elif kind == "image" and images:
            pieces.append(("<|image|>", True))
        elif kind in ("text", "image"):
            what = "a text part needs a string 'text'" if kind == "text" else "images are not allowed here"
            raise _fail(index, f"content[{j}]: {what}")
        else:
            raise _fail(index, f"content[{j}]: unknown part type {kind!r} (expected 'text' or 'image')")
    return pieces


def _header(role: str) -> list[Piece]:
    return [("<|header_start|>", True), (role, False), ("<|header_end|>", True), ("\n\n", False)]


def _system(message: Mapping) -> list[Piece]:
    text = "".join(t for t, _ in _parts(0, message.get("content"), images=False)).strip()
    return [*_header("system"), (text, False), ("<|eot|>", True)]


def _tool_calls(index: int, message: Mapping) -> list[Piece]:
    pieces = [*_header("assistant"), ("<|python_start|>", True), *_parts(index, message.get("content"))]
    pieces.append(("<|python_end|>", True))
    for call in message["tool_calls"]:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise _fail(index, "each tool call needs a 'function' with a string 'name'")
        args = json.dumps(function.get("arguments"), ensure_ascii=False)
        pieces.append(('{"name": "' + function["name"] + '", "parameters": ' + args + "}", False))
    pieces.append(("<|eot|>", True))
    return pieces


def _message(index: int, message: Any) -> list[Piece]:
    if not isinstance(message, Mapping):
        raise _fail(index, f"a message must be a mapping with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise _fail(index, f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if role == "system":
        if index != 0:
            raise _fail(index, "a system message is only allowed first")
        return _system(message)
    if message.get("tool_calls"):
        if role != "assistant" or not isinstance(message["tool_calls"], Sequence):
            raise _fail(index, "'tool_calls' must be a list on an assistant message")
        return _tool_calls(index, message)
    if role in ("tool", "ipython"):
        content = message.get("content")
        if not isinstance(content, (str, Mapping, Sequence)):
            raise _fail(index, "tool content must be a string, a mapping or a list")
        return [*_header("ipython"), (json.dumps(content, ensure_ascii=False), False), ("<|eot|>", True)]
    return [*_header(role), *_parts(index, message.get("content")), ("<|eot|>", True)]


def chat_pieces(messages: Sequence[Mapping], *, add_generation_prompt: bool = True) -> list[Piece]:
    """The rendered prompt as (text, is_special_token) pieces; validates the messages."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role', 'content'} mappings")
    pieces: list[Piece] = [("<|begin_of_text|>", True)]
    for index, message in enumerate(messages):
        pieces += _message(index, message)
    if add_generation_prompt:
        pieces += _header("assistant")
    return pieces


def render_chat(messages: Sequence[Mapping], *, add_generation_prompt: bool = True) -> str:
    """The Llama 4 chat prompt text, starting with `<|begin_of_text|>`; InvalidInputError if invalid."""
    return "".join(text for text, _ in chat_pieces(messages, add_generation_prompt=add_generation_prompt))


def count_images(messages: Sequence[Mapping]) -> int:
    """How many `<|image|>` placeholders the rendered prompt holds (one per image part)."""
    return sum(1 for text, special in chat_pieces(messages, add_generation_prompt=False)
               if special and text == "<|image|>")


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered prompt, with message text unable to inject special tokens.

    Equal to `tokenizer.encode(render_chat(messages))` whenever no message text contains a
    special-token string.
    """
    ids: list[int] = []
    run: list[str] = []
    for text, special in chat_pieces(messages, add_generation_prompt=add_generation_prompt):
        if not special:
            run.append(text)
            continue
        if run:
            ids += tokenizer.encode("".join(run), allow_special=False)
            run = []
        ids.append(tokenizer.token_id(text))
    if run:
        ids += tokenizer.encode("".join(run), allow_special=False)
    return ids
