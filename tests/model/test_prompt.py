"""model.prompt against transformers' Llama4Processor on a synthetic tokenizer."""

from __future__ import annotations

import pytest
from PIL import Image
from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor
from transformers.models.llama4.processing_llama4 import Llama4Processor

from model.chat import encode_chat
from model.errors import InvalidInputError
from model.prompt import count_patch_tokens, expand_image_tokens, image_token_ids

# (width, height) in pixels: one tile, wide, tall, large multi-row, odd sizes
IMAGE_SIZES = [(20, 20), (120, 40), (30, 90), (200, 150), (57, 33)]



def _images(sizes):
    return [Image.new("RGB", size, color=(17 * i % 255, 90, 200)) for i, size in enumerate(sizes)]


def _processor(hf, tile):
    image_processor = Llama4ImageProcessor(size={"height": tile, "width": tile})
    return Llama4Processor(image_processor=image_processor, tokenizer=hf, patch_size=14)


def test_image_token_ids_layout(tok):
    ids = tok.image_ids
    assert image_token_ids((1, 1), 2, ids) == [ids.image_start, ids.image, ids.patch, ids.patch, ids.image_end]
    p = ids.patch
    assert image_token_ids((2, 2), 1, ids) == [
        ids.image_start, p, ids.tile_x, p, ids.tile_y, p, ids.tile_x, p, ids.tile_y, ids.image, p, ids.image_end,
    ]


@pytest.mark.parametrize("tile", [28, 56])
def test_expand_matches_llama4_processor(tok, hf, tile):
    processor = _processor(hf, tile)
    tokens_per_tile = (tile // 14) ** 2 // 4
    images = _images(IMAGE_SIZES)
    text = "Look: " + " and ".join("<|image|>" for _ in images) + ". Which is wider? 日本"
    expected = processor(text=text, images=images)["input_ids"][0]

    ratios = [tuple(int(v) for v in r) for r in processor.image_processor(images)["aspect_ratios"]]
    assert (1, 1) in ratios and any(r[0] * r[1] > 2 for r in ratios) and any(r[0] > 1 for r in ratios)
    ours = expand_image_tokens(tok.encode(text, add_bos=True), ratios, tokens_per_tile, tok.image_ids)
    assert ours == list(expected)

    pixel_values = processor(text=text, images=images, return_tensors="pt")["pixel_values"]
    assert count_patch_tokens(ratios, tokens_per_tile) == pixel_values.shape[0] * tokens_per_tile
    assert ours.count(tok.image_ids.patch) == count_patch_tokens(ratios, tokens_per_tile)


def test_chat_path_matches_processor(tok, hf):
    processor = _processor(hf, 28)
    messages = [
        {"role": "system", "content": "Describe images."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
    ]
    images = _images([(100, 30), (25, 25)])
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = processor(text=rendered, images=images, add_special_tokens=False)["input_ids"][0]
    ratios = [tuple(int(v) for v in r) for r in processor.image_processor(images)["aspect_ratios"]]
    assert expand_image_tokens(encode_chat(tok, messages), ratios, 1, tok.image_ids) == list(expected)


def test_no_images_is_identity(tok):
    ids = tok.encode("no pictures here")
    assert expand_image_tokens(ids, [], 144, tok.image_ids) == ids


def test_count_patch_tokens():
    assert count_patch_tokens([(1, 1)], 144) == 144
    assert count_patch_tokens([(2, 3), (1, 1)], 144) == (7 + 1) * 144


def test_placeholder_count_mismatch(tok):
    ids = tok.encode("<|image|> text <|image|>")
    with pytest.raises(InvalidInputError, match="2 <\\|image\\|> placeholders but 1 images"):
        expand_image_tokens(ids, [(1, 1)], 1, tok.image_ids)
    with pytest.raises(InvalidInputError, match="0 <\\|image\\|> placeholders but 1 images"):
        expand_image_tokens(tok.encode("none"), [(1, 1)], 1, tok.image_ids)


def test_already_expanded_prompt_rejected(tok):
    ids = image_token_ids((1, 2), 1, tok.image_ids)
    with pytest.raises(InvalidInputError, match="already holds image layout token"):
        expand_image_tokens(ids, [(1, 2)], 1, tok.image_ids)


@pytest.mark.parametrize("ratio", [(0, 1), (1,), (1, -2), ("a", 1)])
def test_bad_aspect_ratio(tok, ratio):
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        image_token_ids(ratio, 1, tok.image_ids)


def test_bad_tokens_per_tile(tok):
    with pytest.raises(InvalidInputError, match="tokens_per_tile"):
        image_token_ids((1, 1), 0, tok.image_ids)
