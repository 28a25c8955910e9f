"""model.tokenizer against transformers' fast tokenizer loading the same synthetic files."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerFast

from model.errors import InvalidInputError, TokenizerError
from model.synth_tokenizer import write_synthetic_tokenizer
from model.tokenizer import LLAMA4_SPECIAL_TOKENS, IncrementalDetokenizer, Tokenizer

NUM_MERGES = 256
BASE = 256 + NUM_MERGES

STRINGS = [
    "Hello world",
    "The model's router sends each token to an expert.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n\n  \n",
    "numbers 1 12 123 1234 12345 3.14159 -42",
    "café naïve résumé Ångström",
    "日本語のテキストと東京",
    "emoji 😀🚀👍🏽 and flags 🇫🇷",
    "привет мир, γειά σου",
    "I'll say it's DON'T and WE'RE",
    "a<|eot|>b<|image|><|patch|> <|header_start|>user<|header_end|>\n\n",
    "<|begin_of_text|>starts special",
    "",
    " ",
    "x" * 300,
    "symbols !@#$%^&*()_+-=[]{}|;':\",./<>?`~ \\ //",
]



def test_special_token_list_layout():
    assert len(LLAMA4_SPECIAL_TOKENS) == 2048 == len(set(LLAMA4_SPECIAL_TOKENS))
    index = LLAMA4_SPECIAL_TOKENS.index
    assert index("<|begin_of_text|>") == 0
    assert (index("<|image_start|>"), index("<|image|>"), index("<|patch|>")) == (80, 90, 92)
    assert LLAMA4_SPECIAL_TOKENS[-1] == "<|reserved_special_token_903|>"
    assert index("<|reasoning_thinking_end|>") == 1143 and index("<|reserved_special_token_0|>") == 1144


def test_special_ids_are_base_plus_index(tok, hf):
    assert tok.vocab_size == BASE + 2048 == len(hf)
    for i, name in enumerate(LLAMA4_SPECIAL_TOKENS):
        assert tok.token_id(name) == BASE + i == hf.convert_tokens_to_ids(name)
    assert tok.bos_id == BASE == hf.bos_token_id
    assert tok.pad_id == BASE + LLAMA4_SPECIAL_TOKENS.index("<|finetune_right_pad|>") == hf.pad_token_id
    stops = ("<|end_of_text|>", "<|eom|>", "<|eot|>")
    assert tok.stop_ids == tuple(BASE + LLAMA4_SPECIAL_TOKENS.index(t) for t in stops)
    ids = tok.image_ids
    assert (ids.image_start, ids.image, ids.patch) == (BASE + 80, BASE + 90, BASE + 92)
    assert (ids.image_end, ids.tile_x, ids.tile_y) == (BASE + 81, BASE + 84, BASE + 85)


@pytest.mark.parametrize("text", STRINGS)
def test_encode_decode_match_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_bos=True) == hf(text)["input_ids"]  # the file's post-processor adds BOS
    assert tok.decode(ids) == hf.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    plain = tok.encode(text, allow_special=False)
    assert plain == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert not any(tok.is_special(i) for i in plain)
    assert tok.decode(plain) == text


def test_special_strings_in_text_are_special(tok):
    ids = tok.encode("a<|eot|>b")
    assert tok.token_id("<|eot|>") in ids and len(ids) == 3


def test_loads_as_pretrained_tokenizer_fast(tok_dir, tok):
    fast = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    text = "The cache holds 123 blocks, 東京 😀"
    assert fast.encode(text, add_special_tokens=False) == tok.encode(text)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|begin_of_text|>" and config["eos_token"] == "<|eot|>"
    assert fast.chat_template == config["chat_template"]
    assert json.loads((tok_dir / "special_tokens_map.json").read_text())["pad_token"] == "<|finetune_right_pad|>"


def test_synthetic_is_deterministic(tmp_path):
    write_synthetic_tokenizer(tmp_path / "a", seed=3)
    write_synthetic_tokenizer(tmp_path / "b", seed=3)
    write_synthetic_tokenizer(tmp_path / "c", seed=4)
    a, b, c = ((tmp_path / d / "tokenizer.json").read_bytes() for d in "abc")
    assert a == b
    assert a != c


def test_num_merges_sets_base_vocab(tmp_path):
    small = write_synthetic_tokenizer(tmp_path, num_merges=40)
    assert small.vocab_size == 256 + 40 + 2048
    assert small.bos_id == 296 and small.image_ids.patch == 296 + 92
    text = "expert router 日本"
    assert small.decode(small.encode(text)) == text


def _stream(tok, ids, **kwargs):
    detok = IncrementalDetokenizer(tok, **kwargs)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


STREAMED = ["日本語 café 😀🚀👍🏽 ok", "привет<|eot|>東京", "plain ascii only", "ctl \x00\x01\x7f\xa0\xad\xff end"]


@pytest.mark.parametrize("text", STREAMED)
def test_incremental_detokenizer(tok, text):
    ids = tok.encode(text)
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces) and tail == ""
    if any(ord(ch) > 0x7FF for ch in text):
        assert "" in pieces  # some character really was split across tokens
    skipped, _ = _stream(tok, ids, skip_special_tokens=True)
    assert "".join(skipped) == tok.decode(ids, skip_special_tokens=True)


def test_incremental_detokenizer_incomplete_tail(tok):
    ids = tok.encode("東")
    assert len(ids) > 1
    pieces, tail = _stream(tok, ids[:-1])
    assert pieces == [""] * (len(ids) - 1)
    assert tail == tok.decode(ids[:-1]) == "\ufffd"


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_unreadable_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.from_dir(tmp_path)


def test_tokenizer_lacking_patch_token(tok_dir, tmp_path):
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    for added in data["added_tokens"]:
        if added["content"] == "<|patch|>":
            added["content"] = "<|not_a_patch|>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=r"<\|patch\|>"):
        Tokenizer.from_dir(tmp_path / "tokenizer.json")


def test_bad_inputs(tok):
    with pytest.raises(InvalidInputError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="out of range"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(InvalidInputError, match="integers"):
        tok.decode([1.5])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="out of range"):
        IncrementalDetokenizer(tok).push(-1)
    with pytest.raises(TokenizerError, match="no token"):
        tok.token_id("<|nope|>")
