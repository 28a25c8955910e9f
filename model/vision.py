"""Llama 4 vision encoder: patch unfold + linear, class token appended last, learned positions,
LayerNorm pre/post, encoder blocks with 2D RoPE and a GELU MLP, pixel shuffle, the adapter MLP
(two GELUs) and the projector to the text width. Names mirror the Hugging Face checkpoint
(`vision_model.*`, `multi_modal_projector.linear_1`).

LayerNorms use PyTorch's default eps (1e-5) as the reference does, whatever `norm_eps` says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VisionConfig
from model.rope import apply_rotary, vision_rope


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        shape = (n, length, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)  # rotations [2, L, D/2] broadcast over N
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(n, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.linear = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(pixels, kernel_size=self.patch_size, stride=self.patch_size)  # [N, C*p*p, L]
        return self.linear(patches.transpose(1, 2))  # [N, L, hidden]


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """`[N, P*P, C]` -> `[N, P*P*ratio^2, C/ratio^2]`: fold 2x2 neighbourhoods (ratio 0.5) into channels."""
    n, num_patches, _ = x.shape
    side = int(num_patches**0.5)
    x = x.view(n, side, side, -1)
    x = x.view(n, side, int(side * ratio), -1).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(side * ratio), int(side * ratio), -1).permute(0, 2, 1, 3).contiguous()
    return x.view(n, -1, x.shape[-1])


class AdapterMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.intermediate_size, cfg.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(cfg.projector_output_dim, cfg.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class PixelShuffleAdapter(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = AdapterMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.ratio))


class VisionModel(nn.Module):
    """`vision_model`: tiles `[N, 3, S, S]` -> features `[N, tokens_per_tile, vision_output_dim]`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        num_positions = cfg.patches_per_side**2 + 1
        self.patch_embedding = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(num_positions, cfg.hidden_size))
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size)
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size)
        self.model = VisionEncoder(cfg)
        self.vision_adapter = PixelShuffleAdapter(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.class_embedding.dtype))  # [N, L, hidden]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm  # class token last
        x = self.layernorm_pre(x)
        rope = vision_rope(self.cfg, device=x.device)
        for layer in self.model.layers:
            x = layer(x, rope)
        x = self.layernorm_post(x)[:, :-1, :]  # drop the class token
        return self.vision_adapter(x)


class Projector(nn.Module):
    """`multi_modal_projector`: vision features -> text embedding width."""

    def __init__(self, vision_output_dim: int, text_hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_output_dim, text_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)
