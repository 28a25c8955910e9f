"""Expansion of `<|image|>` placeholders into the Llama 4 image token layout.

A prompt is tokenized with one `<|image|>` per image; each is then replaced by

    <|image_start|> [tiles] <|image|> <|patch|> * tokens_per_tile <|image_end|>

where, for an image of more than one tile (aspect ratio `(rows, cols)` in tiles), `[tiles]` is,
for every row, the row's tiles (each `tokens_per_tile` `<|patch|>`) joined by
`<|tile_x_separator|>`, followed by `<|tile_y_separator|>`. The trailing `<|patch|>` run is the
global (whole image) tile, present for every image; a one-tile image has no separate global tile.
This is transformers' `Llama4Processor._prompt_split_image`, on ids instead of text.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from model.errors import InvalidInputError
from model.tokenizer import ImageTokenIds


def _check_ratio(aspect_ratio: Sequence[int]) -> tuple[int, int]:
    try:
        rows, cols = (operator.index(v) for v in aspect_ratio)
    except (TypeError, ValueError):
        rows = cols = 0
    if rows < 1 or cols < 1:
        raise InvalidInputError(f"aspect ratio must be two positive tile counts (rows, cols), got {aspect_ratio!r}")
    return rows, cols


def _check_tokens_per_tile(tokens_per_tile: int) -> None:
    if not isinstance(tokens_per_tile, int) or tokens_per_tile < 1:
        raise InvalidInputError(f"tokens_per_tile must be a positive int, got {tokens_per_tile!r}")


def image_token_ids(aspect_ratio: tuple[int, int], tokens_per_tile: int, ids: ImageTokenIds) -> list[int]:
    """The token ids that stand for one image of `aspect_ratio` = (tile rows, tile cols)."""
    rows, cols = _check_ratio(aspect_ratio)
    _check_tokens_per_tile(tokens_per_tile)
    tile = [ids.patch] * tokens_per_tile
    out = [ids.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                out += tile
                if x < cols - 1:
                    out.append(ids.tile_x)
            out.append(ids.tile_y)
    out.append(ids.image)
    out += tile
    out.append(ids.image_end)
    return out


def count_patch_tokens(aspect_ratios: Sequence[tuple[int, int]], tokens_per_tile: int) -> int:
    """Number of `<|patch|>` tokens (= vision embeddings) for these images.

    An image of n > 1 tiles has n tiles plus a global tile; a one-tile image has one tile.
    """
    _check_tokens_per_tile(tokens_per_tile)
    total = 0
    for ratio in aspect_ratios:
        rows, cols = _check_ratio(ratio)
        tiles = rows * cols
        total += (tiles + (1 if tiles > 1 else 0)) * tokens_per_tile
    return total


def expand_image_tokens(
    token_ids: Sequence[int],
    aspect_ratios: Sequence[tuple[int, int]],
    tokens_per_tile: int,
    ids: ImageTokenIds,
) -> list[int]:
    """Replace the i-th `<|image|>` in `token_ids` with the layout of the i-th image.

    `token_ids` must be unexpanded: one `<|image|>` per image and no other image layout token;
    InvalidInputError otherwise, or when placeholders and images differ in number.
    """
    layout = {ids.image_start, ids.image_end, ids.patch, ids.tile_x, ids.tile_y}
    stray = next((t for t in token_ids if t in layout), None)
    if stray is not None:
        raise InvalidInputError(
            f"prompt already holds image layout token id {stray}; give one <|image|> (id {ids.image}) per image"
        )
    placeholders = sum(1 for t in token_ids if t == ids.image)
    if placeholders != len(aspect_ratios):
        raise InvalidInputError(
            f"prompt has {placeholders} <|image|> placeholders but {len(aspect_ratios)} images were given"
        )
    expansions = iter([image_token_ids(r, tokens_per_tile, ids) for r in aspect_ratios])
    out: list[int] = []
    for t in token_ids:
        if t == ids.image:
            out += next(expansions)
        else:
            out.append(t)
    return out
