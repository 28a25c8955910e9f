"""Llama 4 tokenizer: a byte-level BPE read from a Hugging Face `tokenizer.json`.

Special token ids are always read from the file, never hard-coded. `encode` recognizes
special-token strings inside the text (as transformers does) unless `allow_special=False`,
which encodes them as plain text: use that for untrusted user text. `encode` never applies the
file's post-processor; BOS is added only when asked (`add_bos=True`), because a rendered chat
prompt already starts with `<|begin_of_text|>`.
"""

from __future__ import annotations

import codecs
import operator
import threading
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as _Backend

from model.errors import InvalidInputError, TokenizerError


def _special_tokens() -> list[str]:
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    text += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)]
    text += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    text += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(8, 69)]
    vision = ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
              "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
    vision += [f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)]
    vision += ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
    vision += [f"<|vision_reserved_special_token_{i}|>" for i in range(7, 1048)]
    reasoning = [f"<|reasoning_reserved_special_token_{i}|>" for i in range(8)]
    reasoning += ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text + vision + reasoning
    return named + [f"<|reserved_special_token_{i}|>" for i in range(2048 - len(named))]


LLAMA4_SPECIAL_TOKENS: tuple[str, ...] = tuple(_special_tokens())
"""The 2048 Llama 4 special tokens, in id order (id = base vocab size + index)."""

LLAMA4_SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""The Llama 4 (o200k-style) pre-tokenizer split regex."""

BOS, PAD = "<|begin_of_text|>", "<|finetune_right_pad|>"
STOP_TOKENS = ("<|end_of_text|>", "<|eom|>", "<|eot|>")


@dataclass(frozen=True)
class ImageTokenIds:
    """Ids of the tokens that lay out an image in the prompt."""

    image_start: int
    image_end: int
    image: int
    patch: int
    tile_x: int
    tile_y: int


_IMAGE_TOKENS = {"image_start": "<|image_start|>", "image_end": "<|image_end|>", "image": "<|image|>",
                 "patch": "<|patch|>", "tile_x": "<|tile_x_separator|>", "tile_y": "<|tile_y_separator|>"}


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet, inverted: printable char -> the byte it stands for."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER = _byte_decoder()


class Tokenizer:
    """A Llama 4 tokenizer over a `tokenizers.Tokenizer` backend; thread-safe for encode/decode."""

    def __init__(self, backend: _Backend, source: str = "<memory>") -> None:
        self._backend = backend
        self._source = source
        self._plain: _Backend | None = None
        self._lock = threading.Lock()
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._bos = self._required(BOS)
        self._pad = self._required(PAD)
        self._stops = tuple(self._required(t) for t in STOP_TOKENS)
        self._image = ImageTokenIds(**{k: self._required(t) for k, t in _IMAGE_TOKENS.items()})

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path if path.is_file() else path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"tokenizer file {file} not found: the checkpoint needs a tokenizer.json")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as exc:  # the Rust loader raises bare Exception
            raise TokenizerError(f"cannot read tokenizer file {file}: {exc}") from exc
        return cls(backend, str(file))

    def _required(self, token: str) -> int:
        tid = self._backend.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{self._source} lacks the Llama 4 special token {token}")
        if tid not in self._special:
            raise TokenizerError(f"{self._source}: {token} is not registered as a special token")
        return tid

    def token_id(self, token: str) -> int:
        """Id of a token string (e.g. '<|eot|>'); TokenizerError if the vocabulary lacks it."""
        tid = self._backend.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{self._source} has no token {token!r}")
        return tid

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings become special ids unless `allow_special=False`."""
        if not isinstance(text, str):
            raise InvalidInputError(f"text to encode must be a str, got {type(text).__name__}")
        backend = self._backend if allow_special else self._plain_backend()
        ids = backend.encode(text, add_special_tokens=False).ids
        return [self._bos, *ids] if add_bos else ids

    def _plain_backend(self) -> _Backend:
        with self._lock:
            if self._plain is None:
                plain = _Backend.from_str(self._backend.to_str())
                plain.encode_special_tokens = True
                self._plain = plain
            return self._plain

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        """Text of token ids; incomplete UTF-8 sequences become U+FFFD."""
        return self._backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids: list[int]) -> list[int]:
        size = self.vocab_size
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError as exc:
            raise InvalidInputError(f"token ids must be integers: {exc}") from exc
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise InvalidInputError(f"token ids out of range [0, {size}): {bad[:5]}")
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (special tokens: their text in UTF-8)."""
        (token_id,) = self._check_ids([token_id])
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        token = self._backend.id_to_token(token_id)
        assert token is not None  # an id in range that is not an added token is in the BPE vocabulary
        return bytes(_BYTE_DECODER[c] for c in token)

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special token."""
        return token_id in self._special

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the embedding table's rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        """Id of `<|begin_of_text|>`."""
        return self._bos

    @property
    def pad_id(self) -> int:
        """Id of `<|finetune_right_pad|>`."""
        return self._pad

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: `<|end_of_text|>`, `<|eom|>`, `<|eot|>`."""
        return self._stops

    @property
    def image_ids(self) -> ImageTokenIds:
        """Ids of the image layout tokens."""
        return self._image


class IncrementalDetokenizer:
    """Streams text from token ids; holds back bytes of a UTF-8 character split across tokens."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text completed by it (maybe '')."""
        if self._skip and self._tok.is_special(token_id):
            return ""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: return what is held back (an incomplete character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
