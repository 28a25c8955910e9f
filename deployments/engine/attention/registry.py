"""Attention backends by name (`engine.attention_backend` in the config). Entries are import paths,
so choosing one never imports another (a GPU backend's kernels stay unloaded on the CPU)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from model.errors import check_known

if TYPE_CHECKING:
    import torch

ATTENTION_BACKENDS: dict[str, str] = {
    "reference": "deployments.engine.attention.reference:ReferenceBackend",
    "flex": "deployments.engine.attention.flex:FlexBackend",
}
AUTO = "auto"  # flex on CUDA, reference elsewhere (resolved where the device is known)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """The backend `name` stands for on `device` (`auto` -> `flex` on CUDA, `reference` otherwise)."""
    if name == AUTO:
        return "flex" if device.type == "cuda" else "reference"
    return check_known("attention backend", name, ATTENTION_BACKENDS)


def attention_backend(name: str) -> type:
    """The backend class registered under `name`; ConfigError naming the known ones otherwise."""
    module, cls = ATTENTION_BACKENDS[check_known("attention backend", name, ATTENTION_BACKENDS)].split(":")
    return getattr(importlib.import_module(module), cls)
