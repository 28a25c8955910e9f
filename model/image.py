"""Image input for Llama 4: untrusted bytes -> PIL image -> normalized tiles (336px in Scout).

Public API (three steps, each usable alone):

* `decode_image(data, limits)`: the server calls it on uploaded bytes. Checks byte, pixel and format
  limits before any pixel data is decoded, takes the first frame of animated images, applies the
  EXIF orientation (as transformers' `load_image` does), and raises `ImageError` for every bad input.
  `ImageLimits.check_count(n)` bounds the number of images per request.
* `to_rgb(image)`: any pillow mode -> RGB, exactly as transformers' `convert_to_rgb` (transparency is
  composited onto white).
* `ImageProcessor.preprocess(image)`: Llama 4 tiling, a re-implementation of transformers'
  `Llama4ImageProcessor` (tile grid chosen among the `max_patches` canvases, aspect-preserving
  antialiased resize of the uint8 image, zero padding right/bottom, rescale + normalize,
  row-major tiles, then a global tile when there is more than one local tile), configured by the
  checkpoint's preprocessor_config.json (`ImageProcessor.from_dir`, `model.processor_config`).

Pure pillow + torch; transformers is only the reference the tests compare against.
"""

from __future__ import annotations

import io
import math
import platform
import struct
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from model.config import VisionConfig
from model.errors import ConfigError, ImageError
from model.processor_config import ImageProcessorConfig

__all__ = ["ALLOWED_FORMATS", "ImageLimits", "ImageProcessor", "ProcessedImage", "decode_image", "to_rgb"]

# Formats whose pillow decoders are pure header parsing + a codec; no EPS (runs Ghostscript), no
# exotic plugins. Pillow opens multi-picture JPEGs from phone cameras (MPO) through "JPEG".
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


# ---- decoding ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied to untrusted images before they are decoded.

    max_pixels (40 MP, i.e. a 48 MP phone photo is refused, a 24 MP one accepted) bounds decoded
    memory at ~160 MB (RGBA) per image; Llama 4 never looks at more than 1344x1344 pixels anyway.
    It may not exceed pillow's own `Image.MAX_IMAGE_PIXELS` (89.5 MP by default), so pillow's
    decompression-bomb guard never rejects an image that these limits accept.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 8
    formats: tuple[str, ...] = ALLOWED_FORMATS

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ImageLimits.{name} must be >= 1, got {getattr(self, name)}")
        pil_max = Image.MAX_IMAGE_PIXELS
        if pil_max is not None and self.max_pixels > pil_max:
            raise ConfigError(
                f"ImageLimits.max_pixels ({self.max_pixels}) exceeds pillow's MAX_IMAGE_PIXELS ({pil_max})"
            )
        if not self.formats:
            raise ConfigError("ImageLimits.formats must name at least one image format")
        Image.init()  # registers every pillow plugin, so that OPEN lists what pillow can decode
        unknown = [f for f in self.formats if f.upper() not in Image.OPEN]
        if unknown:
            raise ConfigError(f"ImageLimits.formats names formats pillow cannot open: {unknown}")

    def check_count(self, n: int) -> None:
        """Raise `ImageError` when a request carries more than `max_images` images."""
        if n > self.max_images:
            raise ImageError(f"too many images: {n} > {self.max_images}")


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode untrusted image bytes into a loaded PIL image (any mode; pass it to `to_rgb`).

    Order of checks: type, empty, `max_bytes`, header only (format in `limits.formats`, non-zero
    size, `max_pixels`), and only then the pixel data (truncated or corrupt data fails here), so a
    decompression bomb is refused from its header without allocating pixel memory. Pillow's own
    guard raises `DecompressionBombError` above 2x `Image.MAX_IMAGE_PIXELS` (turned into
    `ImageError`); between 1x and 2x it only warns, and `max_pixels` (never above 1x) refuses the
    image right after. Warning filters are process-global, so they are left untouched.
    Animated images (GIF, APNG, WebP, MPO) yield their first frame; the EXIF orientation is applied
    (as transformers' `load_image` does). Every failure is an `ImageError` naming the problem.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"image must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is too large: {len(data)} bytes > max_bytes {limits.max_bytes}")
    header_size = _png_header_size(data)
    if header_size is not None and 0 in header_size:
        raise ImageError(f"image has zero size ({header_size[0]}x{header_size[1]})")
    try:
        image = Image.open(io.BytesIO(data), formats=limits.formats)
    except Image.DecompressionBombError as e:
        raise ImageError(f"image rejected as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"unreadable image: not a {'/'.join(limits.formats)} file, or its header is corrupt"
        ) from None
    except Exception as e:  # pillow raises many types (SyntaxError, struct.error, ...) on crafted headers
        raise ImageError(f"unreadable image: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image has too many pixels: {width}x{height} = {width * height} > max_pixels {limits.max_pixels}"
        )
    try:
        image.load()  # first frame only: pillow opens multi-frame images on frame 0
        ImageOps.exif_transpose(image, in_place=True)  # no copy when there is no orientation tag
    except Exception as e:
        raise ImageError(f"corrupt or truncated {image.format} image: {type(e).__name__}: {e}") from None
    return image


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, so that a zero-size PNG gets a clear message (pillow
    reports it only as unidentifiable)."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


# ---- RGB conversion ----------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any pillow mode to RGB exactly as transformers' `image_transforms.convert_to_rgb`.

    Images with an alpha band (RGBA, LA, PA, ...) or a `transparency` entry (P / L / RGB with a
    transparent color) go through RGBA and are alpha-composited onto opaque white; everything else
    uses pillow's own `convert("RGB")` (L/1 replicated, CMYK naive, I;16 / I / F clipped to 0..255).
    """
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL image, got {type(image).__name__}")
    if image.width <= 0 or image.height <= 0:
        raise ImageError(f"image has zero size ({image.width}x{image.height})")
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as e:
        raise ImageError(f"cannot convert image mode {image.mode!r} to RGB: {e}") from None


# ---- Llama 4 tiling ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision tower.

    pixel_values: float32 `[num_tiles, 3, image_size, image_size]`: the local tiles in row-major
        order, then the global tile when there is more than one local tile.
    aspect_ratio: (tiles high, tiles wide) of the local grid.
    """

    pixel_values: torch.Tensor
    aspect_ratio: tuple[int, int]

    @property
    def num_tiles(self) -> int:
        """Tiles the vision tower encodes (local tiles + the global tile, if any)."""
        return int(self.pixel_values.shape[0])


@lru_cache(maxsize=16)
def _supported_resolutions(max_patches: int, tile: int) -> tuple[tuple[int, int], ...]:
    """Canvases (height, width) of a x b tiles with a * b <= max_patches, in the reference's order
    (grouped by aspect ratio, first-seen order, tile counts descending) so that ties resolve alike."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for count in range(max_patches, 0, -1):
        for h in sorted(d for d in range(1, count + 1) if count % d == 0):
            by_ratio[h / (count // h)].append((h, count // h))
    return tuple((h * tile, w * tile) for group in by_ratio.values() for h, w in group)


def _best_fit(height: int, width: int, resolutions: torch.Tensor, resize_to_max_canvas: bool) -> torch.Tensor:
    """The canvas needing the least upscaling (or, if none can hold the image, the least
    downscaling); ties go to the smallest area. Scales are float32, as in the reference."""
    scale_h = resolutions[:, 0] / height
    scale_w = resolutions[:, 1] / width
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    if len(up) > 0:
        selected = up.max() if resize_to_max_canvas else up.min()
    else:
        selected = scales[scales < 1].max()
    chosen = resolutions[scales == selected]
    return chosen[torch.argmin(chosen[:, 0] * chosen[:, 1])] if len(chosen) > 1 else chosen[0]


def _max_res_without_distortion(height: int, width: int, target_h, target_w) -> tuple[int, int]:
    """Largest (h, w) with the image's aspect ratio inside (target_h, target_w). The targets may be
    0-d int tensors (then the reference computes the scale in float32): keep the same arithmetic."""
    scale_w = target_w / width
    scale_h = target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.floor(height * scale_w), target_h)
    else:
        new_h, new_w = target_h, min(math.floor(width * scale_h), target_w)
    return max(int(new_h), 1), max(int(new_w), 1)


def _resize_uint8(image: torch.Tensor, height: int, width: int, native: bool | None = None,
                  mode: str = "bilinear") -> torch.Tensor:
    """Resize a uint8 `[3, H, W]` tensor bit-identically to torchvision's `resize(..., antialias=True)`
    with interpolation `mode` (a `torch.nn.functional.interpolate` mode, see
    `ImageProcessorConfig.interpolation`). "nearest-exact" resizes uint8 directly without antialias.
    Bilinear, bicubic and lanczos antialias: torch's native uint8 kernel where torchvision uses it
    (bicubic and lanczos on any CPU; bilinear on CPUs with AVX2/AVX512 and arm64), else float32,
    clamp (bicubic, lanczos) and round, as torchvision does. `native` forces one path (the two
    differ by at most one uint8 step)."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    batch = image.unsqueeze(0)
    if mode == "nearest-exact":
        return F.interpolate(batch, size=(height, width), mode=mode)[0]
    if native is None:
        native = image.device.type == "cpu" and (mode != "bilinear" or _native_uint8_bilinear())
    if native:
        return F.interpolate(batch, size=(height, width), mode=mode, align_corners=False, antialias=True)[0]
    out = F.interpolate(batch.float(), size=(height, width), mode=mode, align_corners=False, antialias=True)
    if mode != "bilinear":
        out.clamp_(0, 255)
    return out.round_().to(torch.uint8)[0]


def _native_uint8_bilinear() -> bool:
    """torchvision's choice of the native uint8 bilinear kernel on this CPU."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


class ImageProcessor:
    """Llama 4 image preprocessing, numerically matched to transformers' `Llama4ImageProcessor`
    configured by the same `ImageProcessorConfig` (a checkpoint's preprocessor_config.json).

    The tile grid and the resized/padded uint8 pixels are identical to the reference (same canvas
    search, same torch resize kernel). One deliberate difference: the reference rescales and
    normalizes in bfloat16 (error up to 2**-8 on values in [-1, 1]); we do it in float32, exactly
    `(x * rescale_factor - mean) / std`, and let the vision tower cast.

    Build it with `from_config` / `from_dir`; the keyword form (`ImageProcessor(28, 6, ...)`, the
    remaining `ImageProcessorConfig` fields as keywords) is for tests and tools.
    """

    def __init__(
        self,
        image_size: int = 336,
        max_patches: int = 16,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        resize_to_max_canvas: bool = False,
        **options,
    ) -> None:
        self.config = ImageProcessorConfig(image_size=image_size, max_patches=max_patches, image_mean=mean,
                                           image_std=std, resize_to_max_canvas=resize_to_max_canvas, **options)
        cfg = self.config
        self.image_size = cfg.image_size
        self.max_patches = cfg.max_patches
        self.mean = cfg.image_mean
        self.std = cfg.image_std
        self.resize_to_max_canvas = cfg.resize_to_max_canvas
        # explicit CPU: a model built under `torch.device("meta")` still gets a working processor
        self._resolutions = torch.tensor(_supported_resolutions(cfg.max_patches, cfg.image_size), device="cpu")
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device="cpu").view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32, device="cpu").view(3, 1, 1)

    @classmethod
    def from_config(cls, cfg: ImageProcessorConfig) -> ImageProcessor:
        """The processor for these settings (already validated)."""
        return cls(cfg.image_size, cfg.max_patches, cfg.image_mean, cfg.image_std, cfg.resize_to_max_canvas,
                   resample=cfg.resample, do_rescale=cfg.do_rescale, rescale_factor=cfg.rescale_factor,
                   do_normalize=cfg.do_normalize)

    @classmethod
    def from_dir(cls, path, vision: VisionConfig) -> ImageProcessor:
        """The processor of the checkpoint at `path` (its preprocessor_config.json; defaults with
        tiles of `vision.image_size` when it has none). See `ImageProcessorConfig.from_dir`."""
        return cls.from_config(ImageProcessorConfig.from_dir(path, vision))

    def __repr__(self) -> str:
        return f"ImageProcessor({self.config})"

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        """Tile one PIL image (any mode; converted with `to_rgb`)."""
        rgb = torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1).contiguous()
        height, width = rgb.shape[-2:]
        size, mode = self.image_size, self.config.interpolation
        canvas = _best_fit(height, width, self._resolutions, self.resize_to_max_canvas)
        target_h: int | torch.Tensor
        target_w: int | torch.Tensor
        if self.resize_to_max_canvas:
            target_h, target_w = canvas[0], canvas[1]
        else:  # upscale at most to one tile side (python's min keeps the int unless the tensor is smaller)
            # typeshed's min() cannot say "one of its int and 0-d tensor arguments"
            target_h, target_w = min(max(height, size), canvas[0]), min(max(width, size), canvas[1])  # type: ignore[assignment]
        new_h, new_w = _max_res_without_distortion(height, width, target_h, target_w)
        canvas_h, canvas_w = int(canvas[0]), int(canvas[1])
        resized = _resize_uint8(rgb, new_h, new_w, mode=mode)
        padded = F.pad(resized, (0, canvas_w - new_w, 0, canvas_h - new_h), value=0)
        rows, cols = canvas_h // size, canvas_w // size
        tiles = (
            self._normalize(padded)
            .view(3, rows, size, cols, size)
            .permute(1, 3, 0, 2, 4)
            .reshape(rows * cols, 3, size, size)
        )
        if rows * cols > 1:
            global_tile = self._normalize(_resize_uint8(rgb, size, size, mode=mode))
            tiles = torch.cat([tiles, global_tile.unsqueeze(0)], dim=0)
        return ProcessedImage(pixel_values=tiles.contiguous(), aspect_ratio=(rows, cols))

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 `[3, H, W]` -> float32: `x * rescale_factor` if do_rescale, then `(x - mean) / std` if do_normalize."""
        x = image.to(torch.float32)
        if self.config.do_rescale:
            x = x * self.config.rescale_factor
        if self.config.do_normalize:
            x = (x - self._mean) / self._std
        return x
