"""Which device and dtype a process runs the model on: the one place that decides it."""

from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; anything else is returned as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPUs (the checkpoints' dtype), fp32 on the CPU (exact against the reference)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
