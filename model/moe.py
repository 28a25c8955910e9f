"""Llama 4 feed-forward layers: the dense SwiGLU MLP, and the MoE layer (router -> top-k ->
sigmoid of the chosen logits, which scales the expert *input*; plus an always-on shared expert;
no renormalization).

`MoE` is split so the engine can send work elsewhere: the gate (`MoEGate`, the checkpoint's
`router`) picks experts, `Experts` runs any subset of the routed experts (an expert shard holds a
slice) with a swappable kernel (model/expert_kernel.py), `shared_expert` is a plain MLP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.config import TextConfig
from model.expert_kernel import expert_kernel, expert_swiglu
from model.precision import fp32_linear
from model.quantization import ExpertWeight


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """Routed experts `first_expert .. first_expert + num_experts - 1`, stored as in the checkpoint:
    `gate_up_proj` `[E, hidden, 2 * inter]` (gate columns first), `down_proj` `[E, inter, hidden]`.
    `kernel` does the math (model/expert_kernel.py). Quantized experts hold a weight module of
    model/quantization.py in place of each tensor (`set_weights`); `forward` hands the kernel
    whichever it holds."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, first_expert: int = 0,
                 kernel: str = "reference"):
        super().__init__()
        self.first_expert = first_expert
        self.num_experts = num_experts
        self.kernel = expert_kernel(kernel)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    def set_weights(self, gate_up_proj: ExpertWeight, down_proj: ExpertWeight) -> None:
        """Replace both stacked weights (dense tensors or quantized weight modules of the same shapes)."""
        for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            delattr(self, name)
            setattr(self, name, nn.Parameter(w, requires_grad=False) if isinstance(w, torch.Tensor) else w)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Sum over the k choices of expert(score * x) for `x` `[T, hidden]`, `expert_ids` and
        `scores` `[T, k]` (global expert ids; choices owned by another shard contribute zero).

        No host sync and static shapes: all `T * k` (token, choice) pairs are sorted by local
        expert, the pairs not owned here going to a sentinel bucket `E` after the last expert
        (zero-scored, counted by no expert, their output added to a scratch row that is dropped).
        """
        t, k = expert_ids.shape
        local = expert_ids.flatten() - self.first_expert  # [T*k] pair p = token p // k, choice p % k
        owned = (local >= 0) & (local < self.num_experts)
        bucket = torch.where(owned, local, self.num_experts)  # [T*k], E = not owned
        order = torch.argsort(bucket, stable=True)  # [T*k]
        owned, token = owned[order], order // k
        pair_scores = torch.where(owned, scores.flatten()[order], 0.0)  # [T*k]
        inputs = x[token] * pair_scores[:, None].to(x.dtype)  # [T*k, hidden]
        counts = torch.zeros(self.num_experts + 1, dtype=torch.long, device=x.device)
        counts = counts.scatter_add_(0, bucket, torch.ones_like(bucket))[: self.num_experts]  # [E]
        rows = self.kernel(inputs, counts, self.gate_up_proj, self.down_proj)  # [T*k, hidden]
        target = torch.where(owned, token, t)  # not owned -> scratch row T
        return x.new_zeros(t + 1, x.shape[1]).index_add_(0, target, rows)[:t]

    def forward_rows(self, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """`forward`'s sum for a few rows, each (token, choice) pair run through its expert on its own,
        routed on the host (one `tolist()`; `expert_swiglu`): no sort, scatter or grouped kernel. For an expert shard's
        small batches on the CPU, where `forward`'s fixed sequence of ~30 ops costs more than the
        math (one row of small-scout: ~0.14 vs ~0.3 ms); `forward` stays the engine's (static
        shapes, no host sync)."""
        out = x.new_zeros(x.shape)
        scores = scores.to(x.dtype)  # as `forward` scales the inputs
        for row, (row_ids, row_scores) in enumerate(zip(expert_ids.tolist(), scores.tolist(), strict=True)):
            for expert, score in zip(row_ids, row_scores, strict=True):
                local = expert - self.first_expert
                if 0 <= local < self.num_experts:
                    rows = x[row : row + 1] * score
                    out[row : row + 1] += expert_swiglu(rows, self.gate_up_proj, self.down_proj, local)
        return out


class MoEGate(nn.Linear):
    """The MoE gate (the checkpoint's `feed_forward.router`): picks each token's experts."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__(hidden_size, num_experts, bias=False)
        self.top_k = top_k

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids `[T, k]` (int64) and their scores `[T, k]` = sigmoid(chosen logits); logits,
        top-k and sigmoid in fp32 whatever the model's dtype (model/precision.py)."""
        logits = fp32_linear(x, self.weight)  # [T, E]
        top_logits, top_ids = torch.topk(logits, self.top_k, dim=-1)
        return top_ids, torch.sigmoid(top_logits)


RoutedExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(x `[T, hidden]`, expert ids `[T, k]`, scores `[T, k]`) -> `[T, hidden]`: where the routed
experts run; `Experts` in-process, or the engine's dispatch to expert shards."""


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig, experts: nn.Module):
        super().__init__()
        self.router = MoEGate(cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok)  # checkpoint name
        self.experts = experts
        self.shared_expert = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, routed: RoutedExperts | None = None) -> torch.Tensor:
        """Shared expert plus the routed experts (`routed`, default this layer's own `experts`)."""
        expert_ids, scores = self.router.route(x)
        return self.shared_expert(x) + (routed or self.experts)(x, expert_ids, scores)
