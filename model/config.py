"""Llama 4 configuration: frozen dataclasses mirroring transformers' `Llama4Config`.

Read from a checkpoint's `config.json` (both the transformers 4.x layout with `rope_theta` +
`rope_scaling`, as the released Scout/Maverick checkpoints have it, and the 5.x layout with
`rope_parameters`), validated once, never mutated. Derived facts (which layers are MoE, which use
RoPE, tokens per image tile) are methods, not stored fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from model.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style RoPE frequency scaling (Scout uses it; Maverick has none)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # routed and shared experts
    intermediate_size_mlp: int  # dense MLP layers (Maverick's odd layers)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int = 1
    interleave_moe_layer_step: int = 1
    moe_layers: tuple[int, ...] | None = None
    no_rope_layer_interval: int = 4
    no_rope_layers: tuple[int, ...] | None = None  # 1 = RoPE layer, 0 = NoPE layer
    use_qk_norm: bool = True
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            object.__setattr__(self, "moe_layers", tuple(range(step - 1, self.num_hidden_layers, step)))
        if not self.no_rope_layers:
            interval = self.no_rope_layer_interval
            flags = tuple(int((i + 1) % interval != 0) for i in range(self.num_hidden_layers))
            object.__setattr__(self, "no_rope_layers", flags)
        self._validate()

    def _validate(self) -> None:
        assert self.moe_layers is not None and self.no_rope_layers is not None  # filled in by __post_init__
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_local_experts "
                f"({self.num_local_experts})"
            )
        if len(self.no_rope_layers) < self.num_hidden_layers:
            raise ConfigError("no_rope_layers must have one entry per layer")
        if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            raise ConfigError(f"moe_layers {self.moe_layers} names layers outside 0..{self.num_hidden_layers - 1}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (Llama 4 uses 'silu')")
        if self.attention_bias:
            raise ConfigError("attention_bias=True is not supported (Llama 4 has no attention bias)")

    def is_moe_layer(self, layer: int) -> bool:
        assert self.moe_layers is not None  # filled in by __post_init__
        return layer in self.moe_layers

    def uses_rope(self, layer: int) -> bool:
        """RoPE layers attend within their chunk; NoPE layers see the whole history."""
        assert self.no_rope_layers is not None  # filled in by __post_init__
        return bool(self.no_rope_layers[layer])

    def is_chunked(self, layer: int) -> bool:
        return self.uses_rope(layer) and self.attention_chunk_size is not None

    def uses_qk_norm(self, layer: int) -> bool:
        return self.use_qk_norm and self.uses_rope(layer)

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    vision_output_dim: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    multi_modal_projector_bias: bool = False

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        side = self.image_size // self.patch_size
        shuffled_side = side * self.pixel_shuffle_ratio
        if shuffled_side != int(shuffled_side):
            raise ConfigError(f"pixel_shuffle_ratio {self.pixel_shuffle_ratio} does not divide {side} patches")
        if self.intermediate_size != int(self.hidden_size / self.pixel_shuffle_ratio**2):
            # The adapter's fc1 takes the pixel-shuffled channels, which the reference sizes by
            # intermediate_size: the two only agree when this holds (it does in Scout and Maverick).
            raise ConfigError(
                f"vision intermediate_size ({self.intermediate_size}) must equal hidden_size / "
                f"pixel_shuffle_ratio**2 ({int(self.hidden_size / self.pixel_shuffle_ratio**2)})"
            )
        if self.projector_output_dim != self.vision_output_dim:
            raise ConfigError("projector_output_dim must equal vision_output_dim")
        if self.multi_modal_projector_bias:
            raise ConfigError("multi_modal_projector_bias=True is not supported")
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ConfigError("vision head_dim must be a multiple of 4 for 2D RoPE")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens per tile after pixel shuffle (144 for 336px tiles of 14px patches)."""
        return int(self.patches_per_side**2 * self.pixel_shuffle_ratio**2)


@dataclass(frozen=True)
class Llama4Config:
    text: TextConfig
    vision: VisionConfig | None = None
    boi_token_index: int | None = None  # <|image_start|>
    eoi_token_index: int | None = None  # <|image_end|>
    image_token_index: int | None = None  # <|patch|>: the positions image features replace
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Llama4Config:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"{file} not found: a Herd model directory needs a Hugging Face config.json")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from e
        return cls.from_hf_dict(data)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> Llama4Config:
        model_type = data.get("model_type")
        if model_type == "llama4_text":
            return cls(text=_text_from_hf(data))
        if model_type != "llama4":
            raise ConfigError(f"model_type {model_type!r} is not a Llama 4 checkpoint ('llama4' expected)")
        try:
            text = _text_from_hf(data["text_config"])
            vision = _vision_from_hf(data["vision_config"]) if data.get("vision_config") else None
        except KeyError as e:
            raise ConfigError(f"config.json lacks {e.args[0]!r}") from e
        return cls(
            text=text,
            vision=vision,
            boi_token_index=data.get("boi_token_index"),
            eoi_token_index=data.get("eoi_token_index"),
            image_token_index=data.get("image_token_index"),
        )

    # ---- writing -------------------------------------------------------------------------
    def to_hf_dict(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """The config.json a Hugging Face Llama 4 checkpoint carries (transformers 4.x and 5.x read
        it); `dtype` names the dtype the weights are stored in."""
        assert self.text.moe_layers is not None and self.text.no_rope_layers is not None  # TextConfig.__post_init__
        text = asdict(self.text)
        scaling = text.pop("rope_scaling")
        text.update(
            model_type="llama4_text",
            moe_layers=list(self.text.moe_layers),
            no_rope_layers=list(self.text.no_rope_layers),
            eos_token_id=list(self.text.eos_token_id),
            rope_scaling=scaling,
            rope_parameters={"rope_type": "llama3" if scaling else "default", "rope_theta": self.text.rope_theta,
                             **(scaling or {})},
        )
        out: dict[str, Any] = {
            "architectures": ["Llama4ForConditionalGeneration"],
            "model_type": "llama4",
            "text_config": text,
            "boi_token_index": self.boi_token_index,
            "eoi_token_index": self.eoi_token_index,
            "image_token_index": self.image_token_index,
            "tie_word_embeddings": False,
            "torch_dtype": dtype,
        }
        if self.vision is not None:
            vision = asdict(self.vision)
            vision.update(model_type="llama4_vision_model", hidden_act="gelu",
                          rope_parameters={"rope_type": "default", "rope_theta": self.vision.rope_theta})
            out["vision_config"] = vision
        return out

    def save(self, path: str | Path, dtype: str = "bfloat16") -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(json.dumps(self.to_hf_dict(dtype), indent=2) + "\n")

    def with_text(self, **changes: Any) -> Llama4Config:
        return replace(self, text=replace(self.text, **changes))


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 500000.0))
    scaling = d.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ConfigError(f"rope scaling {kind!r} is not supported (Llama 4 uses 'llama3' or none)")
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


_TEXT_FIELDS = {f for f in TextConfig.__dataclass_fields__}
_VISION_FIELDS = {f for f in VisionConfig.__dataclass_fields__}


def _text_from_hf(d: dict[str, Any]) -> TextConfig:
    theta, scaling = _rope_from_hf(d)
    kwargs = {k: v for k, v in d.items() if k in _TEXT_FIELDS and k not in ("rope_theta", "rope_scaling")}
    if kwargs.get("head_dim") is None:
        kwargs["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = d["num_attention_heads"]
    eos = d.get("eos_token_id")
    kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    for key in ("moe_layers", "no_rope_layers"):
        if d.get(key) is not None:
            kwargs[key] = tuple(d[key])
    kwargs["attn_temperature_tuning"] = bool(d.get("attn_temperature_tuning", True))
    try:
        return TextConfig(rope_theta=theta, rope_scaling=scaling, **kwargs)
    except TypeError as e:
        raise ConfigError(f"text_config is incomplete: {e}") from e


def _vision_from_hf(d: dict[str, Any]) -> VisionConfig:
    kwargs = {k: v for k, v in d.items() if k in _VISION_FIELDS}
    params = d.get("rope_parameters") or {}
    kwargs["rope_theta"] = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    try:
        return VisionConfig(**kwargs)
    except TypeError as e:
        raise ConfigError(f"vision_config is incomplete: {e}") from e
