"""model/image.py against transformers' Llama4ImageProcessor (the reference), plus bad-input handling.

Tolerance, stated once: the reference rescales + normalizes in bfloat16, we do it in float32. bf16
rounding of a value in [-1, 1] costs up to 2**-8 (~1/255); one uint8 step is 2/255 after
normalization. The contract is therefore |ours - ref| <= 2/255 + 2**-8, and >= 99% of pixels on the
same uint8 code. To isolate the resampler from the bf16 rounding, both outputs are mapped back to
uint8 codes (ours exactly: (v * std + mean) * 255; the reference's through the inverse of its own
bf16 normalization, which is one-to-one on 0..255). In this environment the codes are identical
(bit-exact resize), which `_compare` asserts too; measured differences are printed under `-s`.
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import VisionConfig
from model.errors import ConfigError, ImageError, InvalidInputError
from model.image import ImageLimits, ImageProcessor, ProcessedImage, _resize_uint8, decode_image, to_rgb

llama4_ip = pytest.importorskip("transformers.models.llama4.image_processing_llama4")
from torchvision.transforms.v2 import functional as tvF  # noqa: E402
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb  # noqa: E402

UINT8_STEP = 2 / 255
BF16_ROUNDING = 2**-8
TOL = UINT8_STEP + BF16_ROUNDING + 1e-6


# ---- helpers ------------------------------------------------------------------------------------


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients + seeded noise: smooth and high-frequency content, so resampler differences show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * 7 + y * 13) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(-48, 48, (height, width, 3)), 0, 255).astype(np.uint8))


def noise(width: int, height: int, seed: int, high: int = 256, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, (height, width)).astype(dtype)


_REFS: dict[tuple, object] = {}


def reference(size: int = 336, max_patches: int = 16, resize_to_max_canvas: bool = False, mean=None, std=None):
    key = (size, max_patches, resize_to_max_canvas, mean, std)
    if key not in _REFS:
        kwargs = {} if mean is None else {"image_mean": list(mean), "image_std": list(std)}
        _REFS[key] = llama4_ip.Llama4ImageProcessor(
            size={"height": size, "width": size}, max_patches=max_patches, resize_to_max_canvas=resize_to_max_canvas,
            **kwargs)
    return _REFS[key]


def ref_bf16_normalize(codes: torch.Tensor, mean, std) -> torch.Tensor:
    """The reference's own `rescale_and_normalize` (bf16) applied to uint8 codes."""
    return tvF.normalize(codes.to(torch.bfloat16) * (1 / 255), list(mean), list(std))


def _compare(ours: ImageProcessor, ref, image: Image.Image, case: str) -> dict:
    out = ref(image, return_tensors="pt")
    ref_px, ref_ar = out["pixel_values"], tuple(out["aspect_ratios"][0].tolist())
    got = ours.preprocess(image)
    assert isinstance(got, ProcessedImage)
    assert got.aspect_ratio == ref_ar, case
    assert got.pixel_values.shape == ref_px.shape, case
    assert got.pixel_values.dtype == torch.float32
    assert got.num_tiles == ref_px.shape[0]

    diff = (got.pixel_values - ref_px.float()).abs().max().item()
    mean = torch.tensor(ours.mean).view(3, 1, 1)
    std = torch.tensor(ours.std).view(3, 1, 1)
    our_codes = torch.round((got.pixel_values * std + mean) * 255)
    assert (our_codes - (got.pixel_values * std + mean) * 255).abs().max() < 1e-3  # really uint8 codes
    our_codes = our_codes.to(torch.uint8)
    # Reference codes: invert its bf16 normalization with a per-channel lookup table.
    table = ref_bf16_normalize(torch.arange(256, dtype=torch.uint8).view(1, 256, 1).expand(3, 256, 1), ours.mean,
                               ours.std)[..., 0].float()  # [3, 256]
    ref_codes = torch.empty_like(our_codes)
    for c in range(3):
        assert len(set(table[c].tolist())) == 256
        idx = torch.searchsorted(table[c].contiguous(), ref_px[:, c].float().contiguous())
        ref_codes[:, c] = idx.to(torch.uint8)
        assert torch.equal(table[c][idx], ref_px[:, c].float())
    steps = (our_codes.int() - ref_codes.int()).abs()
    same = (steps == 0).float().mean().item()
    stats = {"max_abs": diff, "max_steps": int(steps.max()), "same_code": same, "tiles": ref_px.shape[0]}
    print(f"{case}: grid {ref_ar} tiles {stats['tiles']} max|ours-ref| {diff:.5f} "
          f"max uint8 steps {stats['max_steps']} same code {same:.4%}")

    assert diff <= TOL, (case, diff)
    assert stats["max_steps"] <= 1 and same >= 0.99, (case, stats)
    # Bit-exact resampling here: the reference's bf16 normalization of our codes is its output.
    assert torch.equal(ref_bf16_normalize(our_codes, ours.mean, ours.std), ref_px), case
    return stats


# ---- tiling vs the reference --------------------------------------------------------------------

SIZES_336 = [(1, 1), (2000, 30), (30, 2000), (3000, 3000), (5000, 400), (336, 336), (672, 1008), (1344, 1344),
             (335, 337), (500, 377), (13, 1347)]
SIZES_28 = [(1, 1), (200, 3), (3, 200), (300, 300), (500, 40), (28, 28), (56, 84), (112, 112), (27, 29),
            (97, 61), (2000, 30), (5000, 400)]


@pytest.mark.parametrize("width,height", SIZES_336)
def test_sizes_match_reference_336(width, height):
    _compare(ImageProcessor(), reference(), noisy_rgb(width, height, seed=width + height), f"336 {width}x{height}")


@pytest.mark.parametrize("resize_to_max_canvas", [False, True])
@pytest.mark.parametrize("width,height", SIZES_28)
def test_sizes_match_reference_28(width, height, resize_to_max_canvas):
    _compare(ImageProcessor(image_size=28, max_patches=16, resize_to_max_canvas=resize_to_max_canvas),
             reference(28, 16, resize_to_max_canvas), noisy_rgb(width, height, seed=width * height),
             f"28 max_canvas={resize_to_max_canvas} {width}x{height}")


def test_max_canvas_336():
    for w, h in [(1, 1), (500, 377), (2000, 30)]:
        _compare(ImageProcessor(resize_to_max_canvas=True), reference(resize_to_max_canvas=True),
                 noisy_rgb(w, h, seed=3), f"336 max_canvas=True {w}x{h}")


def test_random_sizes_and_patch_budgets_match_reference():
    """Sweep of sizes and max_patches: grid choice (float32 ties included) and pixels."""
    rng = np.random.default_rng(1234)
    for i in range(150):
        w, h = (int(v) for v in rng.integers(1, 400, 2))
        if i % 5 == 0:  # extreme aspect ratios
            w, h = (w * 8, max(h // 40, 1)) if i % 10 else (max(w // 40, 1), h * 8)
        mp = int(rng.choice([1, 2, 3, 5, 6, 9, 12, 16, 20]))
        mc = bool(i % 2)
        _compare(ImageProcessor(28, mp, resize_to_max_canvas=mc), reference(28, mp, mc), noisy_rgb(w, h, seed=i),
                 f"sweep 28 mp={mp} max_canvas={mc} {w}x{h}")


def test_custom_mean_std_match_reference():
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ours = ImageProcessor(28, 16, mean=mean, std=std)
    out = reference(28, 16, mean=mean, std=std)(noisy_rgb(97, 61), return_tensors="pt")["pixel_values"]
    got = ours.preprocess(noisy_rgb(97, 61)).pixel_values
    # values reach ~2.1 here, where bf16 spacing is 2**-6; the reference also rounds mean/std to bf16
    assert (got - out.float()).abs().max() <= 2**-5


def test_tiles_are_row_major_and_global_tile_is_whole_image():
    image = noisy_rgb(84, 56)  # exactly 2 x 3 tiles of 28: no resize, no padding
    got = ImageProcessor(image_size=28).preprocess(image)
    assert got.aspect_ratio == (2, 3) and got.num_tiles == 7
    full = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    for r in range(2):
        for c in range(3):
            torch.testing.assert_close(got.pixel_values[r * 3 + c], full[:, r * 28:(r + 1) * 28, c * 28:(c + 1) * 28])
    small = _resize_uint8(torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(), 28, 28)
    torch.testing.assert_close(got.pixel_values[6], (small.float() / 255 - 0.5) / 0.5)


def test_upscaling_limited_and_padding_zero():
    got = ImageProcessor(image_size=28).preprocess(noisy_rgb(10, 5))
    assert got.aspect_ratio == (1, 1)
    # 10x5 is upscaled to 28x14 only (one tile side), the bottom half is padding = normalized 0
    assert torch.all(got.pixel_values[0, :, 14:, :] == -1.0)
    assert not torch.all(got.pixel_values[0, :, :14, :] == -1.0)


def test_resize_paths_agree_within_one_step():
    image = torch.from_numpy(np.array(noisy_rgb(301, 207))).permute(2, 0, 1).contiguous()
    for h, w in [(28, 28), (150, 97), (600, 450)]:
        a = _resize_uint8(image, h, w, native=True).int()
        b = _resize_uint8(image, h, w, native=False).int()
        assert (a - b).abs().max() <= 1


def test_defaults_without_a_processor_config(tmp_path):
    cfg = VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                       image_size=28, patch_size=14)
    proc = ImageProcessor.from_dir(tmp_path, cfg)  # no preprocessor_config.json: tiles of the tower's size
    assert (proc.image_size, proc.max_patches) == (28, 16)
    assert proc.preprocess(noisy_rgb(60, 30)).pixel_values.shape[-2:] == (28, 28)
    with pytest.raises(ConfigError):
        ImageProcessor(image_size=0)
    with pytest.raises(ConfigError):
        ImageProcessor(std=(0.5, 0.0, 0.5))


# ---- modes --------------------------------------------------------------------------------------


def mode_images() -> dict[str, Image.Image]:
    w, h = 97, 61
    rgb = noisy_rgb(w, h, seed=7)
    alpha = Image.fromarray(noise(w, h, 8))
    lum = rgb.convert("L")
    pal = rgb.quantize(colors=64)
    out = {
        "RGB": rgb,
        "RGBA": Image.merge("RGBA", (*rgb.split(), alpha)),
        "P": pal,
        "L": lum,
        "LA": Image.merge("LA", (lum, alpha)),
        "PA": Image.merge("PA", (pal, alpha)),
        "I;16": Image.fromarray(noise(w, h, 9, high=1024, dtype=np.uint16)),
        "I;16 full range": Image.fromarray(noise(w, h, 10, high=65536, dtype=np.uint16)),
        "I": Image.fromarray(noise(w, h, 11, high=400, dtype=np.int32)),
        "F": Image.fromarray(noise(w, h, 12, high=300, dtype=np.float32)),
        "CMYK": Image.merge("CMYK", [Image.fromarray(noise(w, h, s)) for s in (13, 14, 15, 16)]),
        "1": rgb.convert("1"),
        "YCbCr": rgb.convert("YCbCr"),
    }
    p_index = pal.copy()
    p_index.info["transparency"] = 5
    out["P transparency index"] = p_index
    p_table = pal.copy()
    p_table.info["transparency"] = bytes(range(0, 256, 4))
    out["P transparency table"] = p_table
    l_trns = lum.copy()
    l_trns.info["transparency"] = 128
    out["L transparency"] = l_trns
    return out


MODES = list(mode_images())


@pytest.mark.parametrize("name", MODES)
def test_to_rgb_matches_transformers(name):
    image = mode_images()[name]
    ours = to_rgb(image)
    assert ours.mode == "RGB" and ours.size == image.size
    np.testing.assert_array_equal(np.array(ours), hf_convert_to_rgb(image, return_numpy=True))


@pytest.mark.parametrize("name", MODES)
def test_modes_match_reference(name):
    image = mode_images()[name]
    _compare(ImageProcessor(image_size=28), reference(28), image, f"28 mode {name}")
    if name in ("RGBA", "P transparency index", "I;16", "CMYK", "1", "LA"):
        big = image.resize((image.width * 8, image.height * 8), Image.NEAREST)
        _compare(ImageProcessor(), reference(), big, f"336 mode {name} {big.width}x{big.height}")


# ---- decoding -----------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("name,fmt,lossless", [
    ("RGB", "PNG", True), ("RGBA", "PNG", True), ("P transparency index", "PNG", True), ("LA", "PNG", True),
    ("I;16", "PNG", True), ("1", "PNG", True), ("L", "JPEG", False), ("CMYK", "JPEG", False),
    ("CMYK", "TIFF", True), ("RGB", "BMP", True), ("RGBA", "WEBP", False), ("P transparency index", "GIF", True),
])
def test_decode_roundtrip_then_matches_reference(name, fmt, lossless):
    source = mode_images()[name]
    image = decode_image(encode(source, fmt, **({"lossless": True} if fmt == "WEBP" else {})), ImageLimits())
    assert image.size == source.size
    if lossless:
        np.testing.assert_array_equal(np.array(to_rgb(image)), np.array(to_rgb(source)))
    _compare(ImageProcessor(image_size=28), reference(28), image, f"decoded {fmt} {name} ({image.mode})")


def test_animated_images_take_first_frame():
    frames = [Image.new("RGB", (20, 10), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt in ("GIF", "PNG", "WEBP"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50,
                      **({"lossless": True} if fmt == "WEBP" else {}))
        assert Image.open(io.BytesIO(data)).n_frames == 3, fmt
        image = decode_image(data, ImageLimits())
        assert to_rgb(image).getpixel((5, 5)) == (255, 0, 0), fmt


def test_exif_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image = decode_image(encode(noisy_rgb(40, 20), "JPEG", exif=exif), ImageLimits())
    assert image.size == (20, 40)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR (correct CRC) claiming width x height, and no pixel data at all."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_image_error(data, match: str, limits: ImageLimits | None = None) -> ImageError:
    with pytest.raises(ImageError, match=match) as info:
        decode_image(data, limits or ImageLimits())
    assert isinstance(info.value, InvalidInputError)
    return info.value


def test_bad_bytes():
    assert_image_error(b"", "empty")
    assert_image_error("not bytes", "must be bytes")
    assert_image_error(b"hello, this is not an image at all", "unreadable image")
    assert_image_error(encode(noisy_rgb(8, 8), "PPM"), "unreadable image: not a PNG/JPEG")  # format not allowed
    assert_image_error(encode(noisy_rgb(8, 8), "JPEG"), "not a PNG file", ImageLimits(formats=("PNG",)))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated(fmt):
    data = encode(noisy_rgb(200, 150), fmt)
    err = assert_image_error(data[: len(data) // 2], "truncated|unreadable")
    print(f"truncated {fmt}: {err}")


def test_corrupt_png_data():
    data = bytearray(encode(noisy_rgb(64, 64), "PNG"))
    start = data.index(b"IDAT") + 20
    data[start:start + 40] = bytes(40)
    assert_image_error(bytes(data), "corrupt or truncated")


def test_zero_size():
    assert_image_error(png_header_only(0, 5), r"zero size \(0x5\)")
    assert_image_error(png_header_only(7, 0), r"zero size \(7x0\)")
    with pytest.raises(ImageError, match="zero size"):
        to_rgb(Image.new("RGB", (0, 4)))
    with pytest.raises(ImageError, match="zero size"):
        ImageProcessor().preprocess(Image.new("RGB", (4, 0)))


@pytest.mark.parametrize("width,height,match", [
    (100_000, 100_000, "decompression bomb"),  # beyond pillow's hard limit: its DecompressionBombError
    (8_000, 8_000, "too many pixels: 8000x8000"),  # under pillow's limits, over ours
])
def test_decompression_bomb_rejected_from_header(width, height, match):
    data = png_header_only(width, height)
    assert len(data) < 100
    before = Image.core.get_stats()["new_count"]
    start = time.perf_counter()
    assert_image_error(data, match)
    assert time.perf_counter() - start < 0.5
    # pillow allocated no image memory (a load would have needed 30 GB / 192 MB)
    assert Image.core.get_stats()["new_count"] == before


def test_pillow_bomb_warning_zone_is_an_image_error():
    data = png_header_only(10_000, 10_000)  # 100 MP: pillow warns (above 89.5 MP), we refuse
    before = Image.core.get_stats()["new_count"]
    with pytest.warns(Image.DecompressionBombWarning):
        assert_image_error(data, "too many pixels")
    assert Image.core.get_stats()["new_count"] == before


def test_limits():
    small = encode(noisy_rgb(40, 30), "PNG")
    assert_image_error(small, f"too large: {len(small)} bytes > max_bytes 100", ImageLimits(max_bytes=100))
    assert_image_error(small, "too many pixels: 40x30 = 1200 > max_pixels 1000", ImageLimits(max_pixels=1000))
    assert decode_image(small, ImageLimits(max_bytes=len(small), max_pixels=1200)).size == (40, 30)
    limits = ImageLimits()
    limits.check_count(limits.max_images)
    with pytest.raises(ImageError, match=f"too many images: 9 > {limits.max_images}"):
        limits.check_count(9)
    with pytest.raises(ConfigError):
        ImageLimits(max_pixels=0)
    with pytest.raises(ConfigError):
        ImageLimits(max_pixels=10**10)
    with pytest.raises(ConfigError, match="cannot open"):
        ImageLimits(formats=("PNG", "NOPE"))
