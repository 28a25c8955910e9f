"""Llama 4 text decoder in plain PyTorch, on flattened token batches `[T, hidden]`.

Parameter names mirror the Hugging Face checkpoint (`language_model.model.layers.N...`), so a
state dict loads without renaming. The decoder block is wired once, here; what differs between the
whole-sequence reference forward and the engine's paged step is passed in: the attention function
(`Attend`: an explicit mask here, the paged KV cache in the engine) and where the routed experts
run (`RoutedExperts`: in-process, or on expert shards).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.config import TextConfig
from model.moe import MLP, Experts, MoE, RoutedExperts
from model.precision import fp32_linear, residual_dtype
from model.rope import apply_rotary

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""(q `[T, H, D]`, k and v `[T, KV, D]` of the new tokens, scale) -> `[T, H, D]`."""


def masked_attention(mask: torch.Tensor) -> Attend:
    """Whole-sequence attention over the tokens given, `mask` `[T, T]` True where a query may attend."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # [H, T, D]
            attn_mask=mask, scale=scale, enable_gqa=True,
        )
        return out.transpose(0, 1)  # [T, H, D]

    return attend


class RMSNorm(nn.Module):
    """RMS norm computed in fp32, weight product included, rounded once to the output dtype: the
    weight's (the model's dtype, whatever the input's: the residual stream may be fp32), or the
    input's for a weightless norm (model/precision.py)."""

    def __init__(self, dim: int, eps: float, weighted: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weighted else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(self.weight.dtype)


class Attention(nn.Module):
    """GQA attention. RoPE layers: rotate, then weightless L2 (RMS) norm on q and k when
    `use_qk_norm`. NoPE layers: no rotation, query temperature tuning by absolute position.

    q, k and v come from one GEMM: their weights are stacked in `qkv_proj` `[(H + 2 KV) * D, hidden]`,
    while the state dict keeps the checkpoint's `q_proj.weight`, `k_proj.weight` and `v_proj.weight`
    (views of it when saved; stacked when loaded)."""

    _PARTS = ("q_proj", "k_proj", "v_proj")

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.use_rope = cfg.uses_rope(layer)
        self.qk_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, weighted=False) if cfg.uses_qk_norm(layer) else None
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        self.floor_scale = cfg.floor_scale
        self.attn_scale = cfg.attn_scale
        self.qkv_sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        self.qkv_proj = nn.Parameter(torch.empty(sum(self.qkv_sizes), cfg.hidden_size))
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor):
        """Project `x` `[T, hidden]` to q `[T, H, D]`, k and v `[T, KV, D]`, positions applied."""
        t = x.shape[0]
        q, k, v = F.linear(x, self.qkv_proj).split(self.qkv_sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q), self.qk_norm(k)
        if self.temperature_tuning:
            q = (q * self.temperature(positions)[:, None, None]).to(q.dtype)
        return q, k, v

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        fused = destination.pop(prefix + "qkv_proj")
        for name, part in zip(self._PARTS, fused.split(self.qkv_sizes), strict=True):
            destination[f"{prefix}{name}.weight"] = part

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = [f"{prefix}{name}.weight" for name in self._PARTS]
        if all(n in state_dict for n in names):
            parts = [state_dict.pop(n) for n in names]
            if [p.shape[0] for p in parts] == self.qkv_sizes and len({p.shape[1:] for p in parts}) == 1:
                state_dict[prefix + "qkv_proj"] = torch.cat(parts)
            else:
                error_msgs.append(f"{prefix}q/k/v_proj: shapes {[list(p.shape) for p in parts]} do not stack to "
                                  f"{[sum(self.qkv_sizes), self.qkv_proj.shape[1]]}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def temperature(self, positions: torch.Tensor) -> torch.Tensor:
        """Query scale `[T]`: log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1."""
        return torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor,
                attend: Attend) -> torch.Tensor:
        q, k, v = self.qkv(x, positions, rope)
        return self.o_proj(attend(q, k, v, self.scale).flatten(1))


class DecoderLayer(nn.Module):
    """Pre-norm block. `experts` (a range of expert ids) keeps only that slice of the routed
    experts, as an expert shard does; None keeps them all. `expert_kernel` names their kernel."""

    def __init__(self, cfg: TextConfig, layer: int, experts: range | None = None, expert_kernel: str = "reference"):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.is_moe = cfg.is_moe_layer(layer)
        self.feed_forward: MoE | MLP
        if self.is_moe:
            ids = range(cfg.num_local_experts) if experts is None else experts
            routed = Experts(cfg.hidden_size, cfg.intermediate_size, len(ids), ids.start, expert_kernel)
            self.feed_forward = MoE(cfg, routed)
        else:
            self.feed_forward = MLP(cfg.hidden_size, cfg.intermediate_size_mlp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, attend: Attend,
                routed: RoutedExperts | None = None) -> torch.Tensor:
        """`x` `[T, hidden]` at absolute `positions` (the residual stream: the first layer takes the
        embeddings and widens them, model/precision.py); `routed`: where this layer's routed
        experts run (default: its own). Returns the residual stream, fp32 for a bf16 model."""
        x = x.to(residual_dtype(x.dtype))
        h = x + self.self_attn(self.input_layernorm(x), positions, rope, attend)
        return h + self.mlp(self.post_attention_layernorm(h), routed)

    def mlp(self, x: torch.Tensor, routed: RoutedExperts | None) -> torch.Tensor:
        return self.feed_forward(x, routed) if self.is_moe else self.feed_forward(x)


class TextBackbone(nn.Module):
    """`language_model.model`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: TextConfig, experts: range | None = None, expert_kernel: str = "reference"):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, experts, expert_kernel) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TextModel(nn.Module):
    """`language_model`: the backbone plus an untied `lm_head`."""

    def __init__(self, cfg: TextConfig, experts: range | None = None, expert_kernel: str = "reference"):
        super().__init__()
        self.cfg = cfg
        self.model = TextBackbone(cfg, experts, expert_kernel)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm and `lm_head` on the residual stream `x` `[T, hidden]` -> fp32 logits
        `[T, vocab]`, not rounded to the model's dtype on the way (model/precision.py)."""
        h = self.model.norm(x)
        if isinstance(self.lm_head, nn.Linear):
            return fp32_linear(h, self.lm_head.weight)
        return self.lm_head(h).float()  # a quantized lm_head (an FP8 checkpoint that converts it)


def causal_masks(cfg: TextConfig, positions: torch.Tensor) -> dict[bool, torch.Tensor]:
    """Boolean masks `[T, T]` keyed by "is chunked": full causal for NoPE layers; causal within
    the same `attention_chunk_size` chunk for RoPE layers."""
    causal = positions[None, :] <= positions[:, None]
    masks = {False: causal}
    if cfg.attention_chunk_size is not None:
        chunk = positions // cfg.attention_chunk_size
        masks[True] = causal & (chunk[None, :] == chunk[:, None])
    return masks
