"""Named exceptions raised by `model/`: every bad input ends in one of these, with a message that
says what was wrong and what to do about it."""


class HerdModelError(Exception):
    """Base class of every error raised by the model package."""


class ConfigError(HerdModelError, ValueError):
    """A config.json (or preset) is inconsistent or uses a feature Herd does not implement."""


class CheckpointError(HerdModelError):
    """A checkpoint is missing files or tensors, or a tensor has the wrong shape."""


class TokenizerError(HerdModelError):
    """tokenizer.json is missing, unreadable, or lacks a Llama 4 special token."""


class InvalidInputError(HerdModelError, ValueError):
    """A request's input (token ids, images, messages) is invalid."""


class ImageError(InvalidInputError):
    """An image cannot be decoded or breaks a size / pixel / count limit."""
