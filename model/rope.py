"""Rotary position embeddings of Llama 4: 1D (text, adjacent-pair rotation in fp32, optional llama3
frequency scaling) and 2D (vision tiles, class token unrotated).

The rotations are real arithmetic on (cos, sin) tables `[2, L, D/2]` (what transformers computes
with complex numbers; the same products and sums, so equal in fp32), which compilers and CUDA
graphs handle where complex tensors are not."""

from __future__ import annotations

import math

import torch

from model.config import RopeScaling, TextConfig, VisionConfig


def text_inv_freq(cfg: TextConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies `[head_dim / 2]` (fp32), llama3-scaled when the config says so."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim))
    if cfg.rope_scaling is None:
        return inv_freq
    return _llama3_scale(inv_freq, cfg.rope_scaling)


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotations(angles: torch.Tensor) -> torch.Tensor:
    """The (cos, sin) table `[2, L, D/2]` of rotation `angles` `[L, D/2]` (fp32)."""
    return torch.stack([angles.cos(), angles.sin()])


def text_rope(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotations `[2, T, head_dim / 2]` (cos, sin) for absolute `positions` `[T]`."""
    return rotations(positions.float()[:, None] * inv_freq[None, :])


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1) of `x` `[..., L, H, D]` by `rope` `[2, L, D/2]` in fp32:
    (x0 cos - x1 sin, x0 sin + x1 cos), as the complex product (x0 + i x1)(cos + i sin)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., L, H, D/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = rope[0][:, None, :], rope[1][:, None, :]  # [L, 1, D/2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def vision_rope(cfg: VisionConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """2D rotations `[2, P*P + 1, head_dim / 2]` (cos, sin) for the patches of one tile plus the class token (last,
    unrotated). The first half of each head rotates by the patch column, the second by its row."""
    side = cfg.patches_per_side
    idx = torch.arange(side * side, device=device)
    x = (idx % side + 1).float()
    y = (idx // side + 1).float()
    freq_dim = cfg.hidden_size // cfg.num_attention_heads // 2
    rope_freq = 1.0 / (cfg.rope_theta
                       ** (torch.arange(0, freq_dim, 2, device=device)[: freq_dim // 2].float() / freq_dim))
    fx = (x[:, None] * rope_freq[None, :]).repeat_interleave(2, dim=-1)  # [P*P, freq_dim]
    fy = (y[:, None] * rope_freq[None, :]).repeat_interleave(2, dim=-1)
    freqs = torch.cat([fx, fy], dim=-1)[..., ::2]  # [P*P, head_dim / 2]
    freqs = torch.cat([freqs, torch.zeros_like(freqs[:1])], dim=0)  # class token: no rotation
    return rotations(freqs)
