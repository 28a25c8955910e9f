"""Named model shapes: the real Scout and Maverick, and small synthetic ones for tests and demos.

Token ids are never hard-coded here: they come from the tokenizer the checkpoint ships with
(`SpecialIds.from_tokenizer`), so a preset plus a tokenizer gives a complete config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from model.config import Llama4Config, RopeScaling, TextConfig, VisionConfig
from model.errors import ConfigError


@dataclass(frozen=True)
class SpecialIds:
    vocab_size: int
    bos: int
    stop: tuple[int, ...]
    pad: int
    image_start: int
    image_end: int
    patch: int

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        """From a `model.tokenizer.Tokenizer` (ids read from its tokenizer.json)."""
        ids = tok.image_ids
        return cls(tok.vocab_size, tok.bos_id, tuple(tok.stop_ids), tok.pad_id, ids.image_start, ids.image_end,
                   ids.patch)


def _text(ids: SpecialIds, **kw) -> TextConfig:
    return TextConfig(vocab_size=ids.vocab_size, bos_token_id=ids.bos, eos_token_id=ids.stop, pad_token_id=ids.pad,
                      **kw)


def _assemble(ids: SpecialIds, text: TextConfig, vision: VisionConfig) -> Llama4Config:
    return Llama4Config(text=text, vision=vision, boi_token_index=ids.image_start,
                        eoi_token_index=ids.image_end, image_token_index=ids.patch)


_REAL_VISION = VisionConfig(hidden_size=1408, intermediate_size=5632, num_hidden_layers=34, num_attention_heads=16,
                            image_size=336, patch_size=14, projector_input_dim=4096, projector_output_dim=4096,
                            vision_output_dim=4096)
_REAL_TEXT = dict(hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48,
                  num_attention_heads=40, num_key_value_heads=8, head_dim=128, attention_chunk_size=8192,
                  floor_scale=8192, attn_scale=0.1)


def scout(ids: SpecialIds) -> Llama4Config:
    """Llama 4 Scout 17B-16E: all layers MoE (16 experts), QK norm, llama3 RoPE scaling."""
    text = _text(ids, **_REAL_TEXT, num_local_experts=16, use_qk_norm=True, max_position_embeddings=10485760,
                 rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                          original_max_position_embeddings=8192))
    return _assemble(ids, text, _REAL_VISION)


def maverick(ids: SpecialIds) -> Llama4Config:
    """Llama 4 Maverick 17B-128E: dense and MoE layers alternate (128 experts), no QK norm."""
    text = _text(ids, **_REAL_TEXT, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                 max_position_embeddings=1048576)
    return _assemble(ids, text, _REAL_VISION)


def _tiny_vision(hidden: int = 32, image_size: int = 56, layers: int = 2, out: int = 64) -> VisionConfig:
    return VisionConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                        num_attention_heads=2, image_size=image_size, patch_size=14, projector_input_dim=out,
                        projector_output_dim=out, vision_output_dim=out)


_TINY_TEXT = dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=32,
                  floor_scale=16, max_position_embeddings=4096)


def tiny_scout(ids: SpecialIds) -> Llama4Config:
    """Scout-like, tiny: 4 layers (3 chunked RoPE + 1 NoPE), 4 experts, QK norm, llama3 scaling,
    32-token attention chunks, temperature tuning from position 15."""
    text = _text(ids, **_TINY_TEXT, num_local_experts=4, use_qk_norm=True,
                 rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=64))
    return _assemble(ids, text, _tiny_vision())


def tiny_maverick(ids: SpecialIds) -> Llama4Config:
    """Maverick-like, tiny: dense/MoE interleaved, 8 experts, no QK norm, no RoPE scaling."""
    text = _text(ids, **_TINY_TEXT, num_local_experts=8, interleave_moe_layer_step=2, use_qk_norm=False)
    return _assemble(ids, text, _tiny_vision())


def small_scout(ids: SpecialIds) -> Llama4Config:
    """The default demo model of `herd up`: Scout-shaped, ~20M parameters, fast on a laptop CPU."""
    text = _text(ids, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=16,
                 attention_chunk_size=1024, floor_scale=512, use_qk_norm=True,
                 rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                          original_max_position_embeddings=1024))
    return _assemble(ids, text, _tiny_vision(hidden=64, image_size=112, out=256))


# Rows of the released checkpoints' embedding and lm_head (their tokenizer's 200000 text tokens + 2048
# special tokens). `synthesize(config_only=True)` pads a real preset to it by default.
REAL_VOCAB_SIZES = {"scout": 202048, "maverick": 202048}

PRESETS: dict[str, Callable[[SpecialIds], Llama4Config]] = {
    "scout": scout,
    "maverick": maverick,
    "tiny-scout": tiny_scout,
    "tiny-maverick": tiny_maverick,
    "small-scout": small_scout,
}


def preset(name: str, ids: SpecialIds, *, num_layers: int | None = None) -> Llama4Config:
    """The config of preset `name`; `num_layers` shortens the decoder (keeping its layer pattern)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name](ids)
    if num_layers is not None:
        text = replace(cfg.text, num_hidden_layers=num_layers, moe_layers=None, no_rope_layers=None)
        cfg = replace(cfg, text=text)
    return cfg
