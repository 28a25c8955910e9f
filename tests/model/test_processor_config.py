"""The checkpoint's `preprocessor_config.json` drives the image processor everywhere.

A tiny checkpoint whose processor config differs from the defaults in every field (28px tiles for a
28px tower, max_patches 6, resize_to_max_canvas, CLIP mean/std, rescale_factor 1/256, bicubic
resampling) tiles and normalizes images as transformers' processor loaded from the same directory
does, and its image + text logits equal transformers' Llama 4 given the prompt that processor
implies.

Tolerance for pixels, as in `test_image.py::test_custom_mean_std_match_reference`: the reference
rescales and normalizes in bfloat16 (mean and std rounded to bf16 too); with std ~0.27 the values
reach ~2.1, where the bf16 spacing is 2**-6, so |ours - ref| <= 2**-5.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import model
from deployments.engine.inputs import prepare_prompt
from model.checkpoint import fingerprint, load_vision
from model.errors import ConfigError
from model.image import ImageProcessor
from model.processor_config import PREPROCESSOR_FILE, PROCESSOR_FILE, ImageProcessorConfig, Resample
from model.prompt import image_token_ids
from model.tokenizer import ImageTokenIds
from tests.conftest import BOI, EOI, IMAGE, PATCH, TILE_X, TILE_Y, build_reference, reference_logits

PIXEL_TOL = 2**-5
LOGIT_TOL = 1e-4
IDS = ImageTokenIds(image_start=BOI, image_end=EOI, image=IMAGE, patch=PATCH, tile_x=TILE_X, tile_y=TILE_Y)
TOKENS_PER_TILE = 4  # 28px tiles of 7px patches: 4 x 4 patches, pixel shuffle 0.5 -> 2 x 2

# Every field the Llama 4 processor reads, none at its default (transformers' class defaults:
# 336x336, 16 patches, no max canvas, bilinear, 1/255, mean = std = 0.5).
PROCESSOR = {
    "image_processor_type": "Llama4ImageProcessorFast",
    "size": {"height": 28, "width": 28},
    "max_patches": 6,
    "resize_to_max_canvas": True,
    "resample": 3,  # PIL BICUBIC
    "do_rescale": True,
    "rescale_factor": 1 / 256,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
    "do_resize": True,
}
# The report's two images (50x90 and 100x20) first, then a one-tile image and odd shapes.
SIZES = [(50, 90), (100, 20), (28, 28), (300, 40), (7, 3)]


def _image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(transformers reference model, checkpoint dir with PROCESSOR as its preprocessor_config.json)."""
    path = tmp_path_factory.mktemp("processor-config")
    ref, _ = build_reference(path, image_size=28, patch_size=7)
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR, indent=2))
    return ref, path


@pytest.fixture(scope="module")
def hf_processor(ckpt):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(ckpt[1])
    assert type(processor).__name__ == "Llama4ImageProcessor"
    return processor


@pytest.fixture(scope="module")
def ours(ckpt):
    return model.load(ckpt[1])


def _hf_tiles(hf_processor, image: Image.Image) -> tuple[tuple[int, int], torch.Tensor]:
    out = hf_processor(image, return_tensors="pt")
    return tuple(out["aspect_ratios"][0].tolist()), out["pixel_values"].float()


def _prompt(aspect_ratios) -> torch.Tensor:
    """Text ids around each image's token run, laid out for the given tile grids."""
    g = torch.Generator().manual_seed(3)
    ids = []
    for ratio in aspect_ratios:
        ids += torch.randint(0, 400, (3,), generator=g).tolist() + image_token_ids(ratio, TOKENS_PER_TILE, IDS)
    return torch.tensor(ids + torch.randint(0, 400, (5,), generator=g).tolist())


# ---- the report: same tiles as transformers, same logits -----------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_tiles_match_transformers(ours, hf_processor, size):
    image = _image(*size, seed=sum(size))
    ratio, want = _hf_tiles(hf_processor, image)
    got = ours.preprocess_images([image])  # [tiles, 3, 28, 28]
    assert got.shape == want.shape, f"{size}: {got.shape[0]} tiles, transformers makes {want.shape[0]}"
    assert (got - want).abs().max().item() <= PIXEL_TOL
    assert ours.image_processor.preprocess(image).aspect_ratio == ratio


def test_report_two_images(ours, hf_processor):
    """The report's pair: built-in defaults (16 patches, no max canvas) made 9 + 5 = 14 tiles."""
    images = [_image(50, 90, seed=0), _image(100, 20, seed=1)]
    want = sum(_hf_tiles(hf_processor, img)[1].shape[0] for img in images)
    assert want == 7 + 6
    assert ours.preprocess_images(images).shape[0] == want


def test_image_logits_match_transformers(ckpt, ours, hf_processor):
    """The prompt is laid out from transformers' tile grids; our model tiles the images itself and
    the reference model takes our tiles (equal to transformers' pixels up to bf16 rounding, above:
    the random tiny model amplifies that rounding too much for a logit tolerance)."""
    ref, _ = ckpt
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    ids = _prompt([_hf_tiles(hf_processor, img)[0] for img in images])
    got = ours.logits(ids, images)
    want = reference_logits(ref, ids, ours.preprocess_images(images))
    diff = (got - want).abs().max().item()
    assert diff <= LOGIT_TOL, f"max abs logit diff {diff:.3e}"


# ---- one source of truth: every caller gets the checkpoint's processor ---------------------------


def test_config_is_read_from_the_file(ckpt, ours):
    want = ImageProcessorConfig(image_size=28, max_patches=6, resize_to_max_canvas=True, resample=Resample.BICUBIC,
                                rescale_factor=1 / 256, image_mean=tuple(PROCESSOR["image_mean"]),
                                image_std=tuple(PROCESSOR["image_std"]))
    assert ImageProcessorConfig.from_dir(ckpt[1], ours.cfg.vision) == want
    assert ours.image_processor.config == want
    assert load_vision(ckpt[1]).image_processor.config == want  # what the VisionEncoder deployment tiles with


def test_engine_inputs_use_it(ckpt, ours, hf_processor):
    """deployments.engine.inputs expands the prompt with the checkpoint's tile grids."""
    images = [_image(50, 90, seed=0), _image(100, 20, seed=1)]
    tokenizer = SimpleNamespace(image_ids=IDS)
    ids, inputs = prepare_prompt(ours, tokenizer, [7, IMAGE, 8, IMAGE, 9], images, ["a", "b"])
    ratios = [_hf_tiles(hf_processor, img)[0] for img in images]
    assert ids == [7, *image_token_ids(ratios[0], TOKENS_PER_TILE, IDS), 8,
                   *image_token_ids(ratios[1], TOKENS_PER_TILE, IDS), 9]
    assert sum(i.embeds.shape[0] for i in inputs) == ids.count(PATCH)


def test_fingerprint_covers_the_processor_config(ckpt, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt[1], copy)
    before = fingerprint(copy)
    (copy / PREPROCESSOR_FILE).write_text(json.dumps({**PROCESSOR, "max_patches": 5}))
    assert fingerprint(copy) != before


def test_defaults_only_without_a_file(ckpt, tmp_path):
    vision = model.Llama4Config.from_dir(ckpt[1]).vision
    assert ImageProcessorConfig.from_dir(tmp_path, vision) == ImageProcessorConfig(image_size=28)
    (tmp_path / PREPROCESSOR_FILE).write_text(json.dumps({"size": {"height": 28, "width": 28}}))
    assert ImageProcessorConfig.from_dir(tmp_path, vision) == ImageProcessorConfig(image_size=28)
    # a file without `size` means transformers' 336px tiles, which this 28px tower cannot take
    (tmp_path / PREPROCESSOR_FILE).write_text(json.dumps({"max_patches": 6}))
    with pytest.raises(ConfigError, match="size 336x336 does not match the vision tower's image_size 28"):
        ImageProcessorConfig.from_dir(tmp_path, vision)


def test_processor_config_json_wins_as_in_transformers(tmp_path):
    """transformers reads processor_config.json's nested `image_processor` before preprocessor_config.json."""
    from transformers import AutoImageProcessor

    vision = model.VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=7)
    (tmp_path / PREPROCESSOR_FILE).write_text(json.dumps(PROCESSOR))
    (tmp_path / PROCESSOR_FILE).write_text(json.dumps({"image_processor": {**PROCESSOR, "max_patches": 3}}))
    assert ImageProcessorConfig.from_dir(tmp_path, vision).max_patches == 3
    assert AutoImageProcessor.from_pretrained(tmp_path).max_patches == 3


# ---- field semantics against transformers' Llama4ImageProcessor ---------------------------------


@pytest.mark.parametrize("fields", [
    {"resample": 0}, {"resample": 1}, {"resample": 2}, {"resample": 3},
    {"do_normalize": False, "rescale_factor": 0.5 / 255},
    {"do_rescale": False, "do_normalize": False},
    {"image_mean": 0.25, "image_std": [0.75]},  # one value for all channels
    {"size": 28, "max_patches": 2},  # an int size is square
    {"size": [28, 28], "resize_to_max_canvas": True, "max_patches": 9},
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_fields_mean_what_transformers_means(fields):
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

    data = {"size": {"height": 28, "width": 28}, **fields}
    ours = ImageProcessor.from_config(ImageProcessorConfig.from_hf_dict(data))
    ref = Llama4ImageProcessor(**data)
    exact = not ours.config.do_normalize  # no bf16 normalization on the reference side
    for size in SIZES:
        image = _image(*size, seed=sum(size))
        out = ref(image, return_tensors="pt")
        got = ours.preprocess(image)
        assert got.aspect_ratio == tuple(out["aspect_ratios"][0].tolist()), size
        want = out["pixel_values"].float()
        assert got.pixel_values.shape == want.shape, size
        assert (got.pixel_values - want).abs().max().item() <= (1e-6 if exact else PIXEL_TOL), size


def test_round_trip_through_the_hf_dict():
    cfg = ImageProcessorConfig.from_hf_dict(PROCESSOR)
    assert ImageProcessorConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


# ---- nonsense values: ConfigError naming the field ------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"size": {"height": 28, "width": 56}}, "size must be square"),
    ({"size": {"shortest_edge": 28}}, "size must be"),
    ({"size": 0}, "size must be an int >= 1"),
    ({"size": "28"}, "size must be an int >= 1"),
    ({"size": {"height": 56, "width": 56}}, "size 56x56 does not match the vision tower's image_size 28"),
    ({"max_patches": 0}, "max_patches must be an int >= 1"),
    ({"max_patches": 6.5}, "max_patches must be an int >= 1"),
    ({"max_patches": True}, "max_patches must be an int >= 1"),
    ({"resize_to_max_canvas": "yes"}, "resize_to_max_canvas must be true or false"),
    ({"resample": 4}, "resample 4 \\(BOX\\) is not supported"),
    ({"resample": 5}, "resample 5 \\(HAMMING\\) is not supported"),
    ({"resample": 9}, "resample must be a PIL resampling code"),
    ({"resample": "bilinear"}, "resample must be a PIL resampling code"),
    ({"rescale_factor": 0}, "rescale_factor must be > 0"),
    ({"rescale_factor": -1 / 255}, "rescale_factor must be > 0"),
    ({"rescale_factor": "1/255"}, "rescale_factor must be a finite number"),
    ({"image_mean": [0.5, 0.5]}, "image_mean needs one value or three"),
    ({"image_mean": [0.5, "a", 0.5]}, "image_mean must be a finite number"),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std must be > 0"),
    ({"image_std": [0.5, -0.5, 0.5]}, "image_std must be > 0"),
    ({"do_rescale": False}, "do_normalize without do_rescale"),
    ({"do_normalize": 1}, "do_normalize must be true or false"),
    ({"do_resize": False}, "do_resize false is not supported"),
    ({"do_convert_rgb": "no"}, "do_convert_rgb must be true or false"),
    ({"image_processor_type": "CLIPImageProcessor"}, "not a Llama 4 image processor"),
], ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_bad_field_is_named(tmp_path, change, message):
    vision = model.VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=7)
    (tmp_path / PREPROCESSOR_FILE).write_text(json.dumps({**PROCESSOR, **change}))
    with pytest.raises(ConfigError, match=message) as e:
        ImageProcessorConfig.from_dir(tmp_path, vision)
    assert PREPROCESSOR_FILE in str(e.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_unreadable_file(tmp_path, text):
    vision = model.VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=7)
    (tmp_path / PREPROCESSOR_FILE).write_text(text)
    with pytest.raises(ConfigError, match=PREPROCESSOR_FILE):
        ImageProcessorConfig.from_dir(tmp_path, vision)


def test_load_refuses_a_bad_processor_config(ckpt, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt[1], copy)
    (copy / PREPROCESSOR_FILE).write_text(json.dumps({**PROCESSOR, "max_patches": -1}))
    with pytest.raises(ConfigError, match="max_patches"):
        model.load(copy)
    with pytest.raises(ConfigError, match="max_patches"):
        load_vision(copy)
