"""Llama 4 in plain PyTorch: config, text decoder, vision encoder, image processor, tokenizer and
chat format, checkpoint loading and synthetic checkpoints. No Ray, Redis or gRPC here.

Public API: `load(path, *, device, dtype) -> Llama4`, `Llama4.logits(input_ids, images=None)`,
`expand_image_tokens` (from `model.prompt`), and the named errors in `model.errors`.
"""

from model.checkpoint import load
from model.config import Llama4Config, TextConfig, VisionConfig
from model.errors import (
    CheckpointError,
    ConfigError,
    HerdModelError,
    ImageError,
    InvalidInputError,
    TokenizerError,
)
from model.llama4 import Llama4

__all__ = [
    "load", "Llama4", "Llama4Config", "TextConfig", "VisionConfig", "HerdModelError", "ConfigError",
    "CheckpointError", "TokenizerError", "InvalidInputError", "ImageError",
]
