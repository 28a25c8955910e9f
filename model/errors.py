"""Named exceptions raised by `model/`: every bad input ends in one of these, with a message that
says what was wrong and what to do about it."""

from __future__ import annotations

from collections.abc import Collection


class HerdModelError(Exception):
    """Base class of every error raised by the model package."""


class ConfigError(HerdModelError, ValueError):
    """A config.json (or preset) is inconsistent or uses a feature Herd does not implement."""


def check_known(kind: str, name: str, known: Collection[str]) -> str:
    """`name` if it is one of `known` (a registry's names), else a ConfigError naming the choices.
    ConfigError is a ValueError, so pydantic validators raise it as they are."""
    if name not in known:
        raise ConfigError(f"unknown {kind} {name!r}: choose one of {sorted(known)}")
    return name


class CheckpointError(HerdModelError):
    """A checkpoint is missing files or tensors, or a tensor has the wrong shape."""


class TokenizerError(HerdModelError):
    """tokenizer.json is missing, unreadable, or lacks a Llama 4 special token."""


class InvalidInputError(HerdModelError, ValueError):
    """A request's input (token ids, images, messages) is invalid."""


class ImageError(InvalidInputError):
    """An image cannot be decoded or breaks a size / pixel / count limit."""
