"""Expert kernels: the math of the routed experts, swappable behind one interface.

`Experts` (model/moe.py) picks the (token, choice) pairs it owns, scales each token by its gate
score and sorts the rows by expert; a kernel then runs every expert on its contiguous run of rows.
Kernels differ only in how (a Python loop of matmuls here; grouped GEMM or quantized kernels later)
and are chosen by name (`experts.kernel` in the config), so model code never imports a concrete one.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from model.errors import check_known


class ExpertKernel(Protocol):
    def __call__(self, x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor,
                 down_proj: torch.Tensor) -> torch.Tensor:
        """SwiGLU experts on rows sorted by expert: `x` `[N, hidden]`, `counts` `[E]` (int64, sums
        to N; rows of expert e follow those of e - 1), `gate_up_proj` `[E, hidden, 2 * inter]` (gate
        columns first), `down_proj` `[E, inter, hidden]` -> `[N, hidden]`."""
        ...


def reference_kernel(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor,
                     down_proj: torch.Tensor) -> torch.Tensor:
    """One matmul pair per expert that has rows (exact on the CPU; one host sync for the counts)."""
    sizes = counts.tolist()
    outputs = []
    for e, rows in enumerate(x.split(sizes)):
        if sizes[e]:
            gate, up = (rows @ gate_up_proj[e]).chunk(2, dim=-1)  # [n, inter] each
            outputs.append((F.silu(gate) * up) @ down_proj[e])  # [n, hidden]
    return torch.cat(outputs) if outputs else x.new_zeros(0, x.shape[1])


EXPERT_KERNELS: dict[str, ExpertKernel] = {"reference": reference_kernel}


def expert_kernel(name: str) -> ExpertKernel:
    """The kernel registered under `name`; ConfigError naming the known ones otherwise."""
    return EXPERT_KERNELS[check_known("expert kernel", name, EXPERT_KERNELS)]
