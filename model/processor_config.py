"""`ImageProcessorConfig`: the image preprocessing settings of a checkpoint, read from its
`preprocessor_config.json` (transformers' `Llama4ImageProcessor` fields), validated once.

Read as transformers' `AutoImageProcessor.from_pretrained` reads it: the `image_processor` object
of `processor_config.json` when there is one, else `preprocessor_config.json`; a field that is
missing or null takes the processor's class default (336px tiles, 16 patches, bilinear, 1/255,
mean = std = 0.5). Only a checkpoint with neither file gets defaults with the tile side of its
vision tower (`default_for`). The tile side must equal the tower's `image_size`: its position
embeddings fix it.

Fields the Llama 4 processor ignores (`do_center_crop`, `crop_size`, `do_pad`, `data_format`, ...)
are ignored here too. `do_convert_rgb` is accepted but images always become RGB (`model.image.to_rgb`):
the tower takes three channels, and for RGB images the two settings are the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from pathlib import Path
from typing import Any

from model.config import VisionConfig
from model.errors import ConfigError

__all__ = ["ImageProcessorConfig", "PREPROCESSOR_FILE", "PROCESSOR_FILE", "Resample"]

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"  # transformers >= 4.5x may nest the image processor here
LLAMA4_PROCESSOR_TYPES = ("Llama4ImageProcessor", "Llama4ImageProcessorFast")


class Resample(IntEnum):
    """PIL's resampling codes, as `resample` stores them."""

    NEAREST = 0
    LANCZOS = 1
    BILINEAR = 2
    BICUBIC = 3
    BOX = 4
    HAMMING = 5


# `torch.nn.functional.interpolate` mode of each code, as transformers' torchvision backend maps
# them (NEAREST is torchvision's NEAREST_EXACT). BOX and HAMMING have no torch kernel: transformers
# fails on them at the first image, we refuse them at load time.
INTERPOLATION = {
    Resample.NEAREST: "nearest-exact",
    Resample.LANCZOS: "lanczos",
    Resample.BILINEAR: "bilinear",
    Resample.BICUBIC: "bicubic",
}


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Llama 4 image preprocessing: tiles of `image_size` px (the file's square `size`), at most
    `max_patches` local tiles, resize with `resample`, then `x * rescale_factor` (if `do_rescale`)
    and `(x - image_mean) / image_std` (if `do_normalize`)."""

    image_size: int = 336
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    resample: Resample = Resample.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        _check_int("size", self.image_size)
        _check_int("max_patches", self.max_patches)
        for name in ("resize_to_max_canvas", "do_rescale", "do_normalize"):
            _check_bool(name, getattr(self, name))
        object.__setattr__(self, "resample", _resample(self.resample))
        object.__setattr__(self, "rescale_factor", _number("rescale_factor", self.rescale_factor))
        if self.rescale_factor <= 0:
            raise ConfigError(f"rescale_factor must be > 0, got {self.rescale_factor}")
        object.__setattr__(self, "image_mean", _triple("image_mean", self.image_mean))
        object.__setattr__(self, "image_std", _triple("image_std", self.image_std))
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"image_std must be > 0 in every channel, got {list(self.image_std)}")
        if self.do_normalize and not self.do_rescale:
            raise ConfigError("do_normalize without do_rescale is not supported (transformers' Llama 4 "
                              "processor fails on it too): normalize expects rescaled pixels")

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def default_for(cls, vision: VisionConfig) -> ImageProcessorConfig:
        """The settings of a checkpoint without a processor config: defaults, tiles of the tower's size."""
        return cls(image_size=vision.image_size)

    @classmethod
    def from_dir(cls, path: str | Path, vision: VisionConfig) -> ImageProcessorConfig:
        """The settings of the checkpoint at `path` for its tower `vision`; ConfigError naming the
        file and the field when a value is wrong or the tile side is not the tower's."""
        found = _read_processor_dict(Path(path))
        if found is None:
            return cls.default_for(vision)
        file, data = found
        try:
            cfg = cls.from_hf_dict(data)
            cfg.check_vision(vision)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None
        return cfg

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ImageProcessorConfig:
        """Parse a transformers image processor dict (missing or null fields take the defaults)."""
        if not isinstance(data, dict):
            raise ConfigError(f"the image processor config must be a JSON object, got {type(data).__name__}")
        kind = data.get("image_processor_type")
        if kind is not None and kind not in LLAMA4_PROCESSOR_TYPES:
            raise ConfigError(f"image_processor_type {kind!r} is not a Llama 4 image processor "
                              f"(expected one of {list(LLAMA4_PROCESSOR_TYPES)})")
        if data.get("do_resize") is not None:
            _check_bool("do_resize", data["do_resize"])
            if not data["do_resize"]:
                raise ConfigError("do_resize false is not supported: Llama 4 always resizes images to its tile canvas")
        if data.get("do_convert_rgb") is not None:
            _check_bool("do_convert_rgb", data["do_convert_rgb"])
        given = {name: data[name] for name in _FILE_FIELDS if data.get(name) is not None}
        if data.get("size") is not None:
            given["image_size"] = _square_side(data["size"])
        return cls(**given)

    def check_vision(self, vision: VisionConfig) -> None:
        """ConfigError unless the tiles are what the vision tower takes."""
        if self.image_size != vision.image_size:
            raise ConfigError(f"size {self.image_size}x{self.image_size} does not match the vision tower's "
                              f"image_size {vision.image_size} (vision_config in config.json)")

    # ---- writing -------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json transformers reads (4.x and 5.x)."""
        return {
            "image_processor_type": "Llama4ImageProcessorFast",
            "size": {"height": self.image_size, "width": self.image_size},
            "max_patches": self.max_patches,
            "resize_to_max_canvas": self.resize_to_max_canvas,
            "do_resize": True,
            "resample": int(self.resample),
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }

    def save(self, path: str | Path) -> None:
        """Write `preprocessor_config.json` into the checkpoint directory `path`."""
        (Path(path) / PREPROCESSOR_FILE).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @property
    def interpolation(self) -> str:
        """The `torch.nn.functional.interpolate` mode of `resample`."""
        return INTERPOLATION[self.resample]


# The fields read under their own name (the tile side is read from `size`).
_FILE_FIELDS = ("max_patches", "resize_to_max_canvas", "resample", "do_rescale", "rescale_factor", "do_normalize",
                "image_mean", "image_std")


def _read_processor_dict(path: Path) -> tuple[Path, Any] | None:
    """(file, image processor dict) in transformers' order of precedence, or None without either file."""
    nested = path / PROCESSOR_FILE
    if nested.is_file():
        data = _read_json(nested)
        if isinstance(data, dict) and "image_processor" in data:
            return nested, data["image_processor"]
    flat = path / PREPROCESSOR_FILE
    return (flat, _read_json(flat)) if flat.is_file() else None


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e


# ---- field checks: each raises ConfigError naming the field ---------------------------------------


def _check_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    """One value per RGB channel; a number (or a one-element list) applies to all three, as
    transformers' normalize broadcasts it."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise ConfigError(f"{name} needs one value or three (R, G, B), got {value!r}")
    return tuple(_number(name, v) for v in values)  # type: ignore[return-value]


def _square_side(size: Any) -> int:
    """The tile side of `size`: {"height": S, "width": S}, [S, S] or S (transformers' forms)."""
    if isinstance(size, dict):
        if set(size) != {"height", "width"}:
            raise ConfigError(f"size must be {{'height': S, 'width': S}} (Llama 4 tiles are square), got {size!r}")
        height, width = size["height"], size["width"]
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        height, width = size
    else:
        height = width = size
    _check_int("size", height)
    _check_int("size", width)
    if height != width:
        raise ConfigError(f"size must be square (Llama 4 tiles are square), got {height}x{width}")
    return height


def _resample(value: Any) -> Resample:
    if isinstance(value, bool) or not isinstance(value, int) or value not in set(Resample):
        raise ConfigError(f"resample must be a PIL resampling code 0..5, got {value!r}")
    code = Resample(value)
    if code not in INTERPOLATION:
        raise ConfigError(f"resample {int(code)} ({code.name}) is not supported (transformers' Llama 4 "
                          f"processor has no {code.name} resize either); use 0, 1, 2 or 3")
    if not _torch_interpolates(INTERPOLATION[code]):
        raise ConfigError(f"resample {int(code)} ({code.name}) needs a torch with {INTERPOLATION[code]!r} "
                          "interpolation; upgrade torch")
    return code


@cache
def _torch_interpolates(mode: str) -> bool:
    """Whether this torch resizes uint8 images with `mode` (lanczos is recent)."""
    import torch
    import torch.nn.functional as F

    image = torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device="cpu")
    kwargs = {} if mode == "nearest-exact" else {"align_corners": False, "antialias": True}
    try:
        F.interpolate(image, size=(2, 3), mode=mode, **kwargs)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True
