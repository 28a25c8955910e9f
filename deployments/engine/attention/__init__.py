"""Attention backends: how a step's queries read the paged KV cache. The runner talks to the
`AttentionBackend` interface (base.py) and gets a concrete one by name from the registry; a new
backend is one module plus one registry line."""

from deployments.engine.attention.base import AttentionBackend, Layout
from deployments.engine.attention.registry import ATTENTION_BACKENDS, attention_backend, resolve_attention_backend

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "Layout", "attention_backend", "resolve_attention_backend"]
