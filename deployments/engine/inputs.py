"""Turning a user's prompt and images into what `Engine.add_request` takes: expanded token ids
and per-image embeddings (the vision encoder's work when the engine runs alone)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from PIL import Image

from deployments.engine.sequence import ImageInput
from model.errors import InvalidInputError
from model.llama4 import Llama4
from model.prompt import expand_image_tokens
from model.tokenizer import Tokenizer


def image_digest(data: bytes) -> str:
    """The prefix-cache key of an image: a hash of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


@torch.inference_mode()
def prepare_prompt(model: Llama4, tokenizer: Tokenizer, prompt_ids: Sequence[int], images: Sequence[Image.Image],
                   digests: Sequence[str]) -> tuple[list[int], list[ImageInput]]:
    """Expand each `<|image|>` placeholder of `prompt_ids` into the image's token layout and encode
    the images. Without images the ids pass through unchanged."""
    if not images:
        return list(prompt_ids), []
    if model.image_processor is None:
        raise InvalidInputError("this model has no vision tower: it cannot take images")
    if len(digests) != len(images):
        raise ValueError("one digest per image is needed")
    processed = [model.image_processor.preprocess(img) for img in images]  # the checkpoint's processor config
    assert model.cfg.vision is not None  # a model with an image processor has a vision tower
    per_tile = model.cfg.vision.tokens_per_tile
    ids = expand_image_tokens(prompt_ids, [p.aspect_ratio for p in processed], per_tile, tokenizer.image_ids)
    embeds = model.encode_images(torch.cat([p.pixel_values for p in processed]))
    rows = [p.num_tiles * per_tile for p in processed]
    return ids, [ImageInput(e, d) for e, d in zip(embeds.split(rows), digests, strict=True)]
