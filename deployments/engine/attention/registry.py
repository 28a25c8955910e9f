"""Attention backends by name (`engine.attention_backend` in the config). Entries are import paths,
so choosing one never imports another (a GPU backend's kernels stay unloaded on the CPU)."""

from __future__ import annotations

import importlib

from model.errors import ConfigError

ATTENTION_BACKENDS: dict[str, str] = {
    "reference": "deployments.engine.attention.reference:ReferenceBackend",
}


def attention_backend(name: str) -> type:
    """The backend class registered under `name`; ConfigError naming the known ones otherwise."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}: choose one of {sorted(ATTENTION_BACKENDS)}")
    module, cls = ATTENTION_BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)
