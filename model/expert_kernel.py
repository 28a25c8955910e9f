"""Expert kernels: the math of the routed experts, swappable behind one interface.

`Experts` (model/moe.py) scales each (token, choice) pair's token by its gate score and sorts all
`T * k` pairs by expert, the pairs it does not own (another shard's experts) last; a kernel then
runs every expert on its contiguous run of rows. The shapes are static (always `T * k` rows) so
nothing waits for the device to say how many rows an expert got. Kernels differ only in how (a
Python loop of matmuls, one grouped GEMM per projection, quantized kernels) and are chosen by name
(`engine.expert_kernel` in the config), so model code never imports a concrete one.

The interface's one rule beyond the shapes: rows past `counts.sum()` are padding (pairs this
`Experts` does not own; their input is zero) and their output is dropped, so a kernel may leave
them unset (`grouped_kernel` does: `grouped_mm` ignores rows beyond the last offset).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from model.errors import check_known


class ExpertKernel(Protocol):
    def __call__(self, x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor,
                 down_proj: torch.Tensor) -> torch.Tensor:
        """SwiGLU experts on rows sorted by expert: `x` `[N, hidden]`, `counts` `[E]` (int64, on
        x's device, sums to at most N; rows of expert e follow those of e - 1; rows past the sum are
        padding whose output is dropped), `gate_up_proj` `[E, hidden, 2 * inter]` (gate columns
        first), `down_proj` `[E, inter, hidden]` -> `[N, hidden]`."""
        ...


def reference_kernel(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor,
                     down_proj: torch.Tensor) -> torch.Tensor:
    """One matmul pair per expert that has rows (exact on the CPU; one host sync for the counts:
    the yardstick, not the fast path)."""
    sizes = counts.tolist()
    padding = x.shape[0] - sum(sizes)
    outputs = []
    for e, rows in enumerate(x.split([*sizes, padding])[: len(sizes)]):
        if sizes[e]:
            gate, up = (rows @ gate_up_proj[e]).chunk(2, dim=-1)  # [n, inter] each
            outputs.append((F.silu(gate) * up) @ down_proj[e])  # [n, hidden]
    outputs.append(x.new_zeros(padding, down_proj.shape[-1]))
    return torch.cat(outputs)


# F.grouped_mm is the public name (torch >= 2.10); both call aten::_grouped_mm.
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def grouped_kernel(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor) -> torch.Tensor:
    """Two grouped GEMMs (gate/up, then down) over every expert at once, the group boundaries
    as device-side int32 offsets: no host sync, one call per projection whatever the number of
    experts hit, and only the weights of experts that have rows are read (empty groups are
    skipped), so small decode batches need no gather of the chosen experts' weights. Exact
    against `reference_kernel` in fp32 on the CPU (the same matmul per group). On CUDA the fast
    path (CUTLASS) takes bf16 on sm90/sm100; other dtypes use torch's per-group fallback, which
    copies the offsets to the host."""
    offs = counts.cumsum(0, dtype=torch.int32)  # [E] end row of each expert
    gate, up = _grouped_mm(x, gate_up_proj, offs=offs).chunk(2, dim=-1)  # [N, inter] each
    return _grouped_mm(F.silu(gate) * up, down_proj, offs=offs)  # [N, hidden]


EXPERT_KERNELS: dict[str, ExpertKernel] = {"reference": reference_kernel, "grouped": grouped_kernel}


KERNEL_CHOICES = (*EXPERT_KERNELS, "auto")
"""What a config may name: a registered kernel, or `auto` (see `resolve_expert_kernel`)."""


def resolve_expert_kernel(name: str, device: torch.device | str) -> str:
    """`auto` -> `grouped` on CUDA, `reference` elsewhere (the CPU default the tests compare
    against); any other name is checked and returned as it is."""
    if name == "auto":
        return "grouped" if torch.device(device).type == "cuda" else "reference"
    return check_known("expert kernel", name, EXPERT_KERNELS)


def expert_kernel(name: str) -> ExpertKernel:
    """The kernel registered under `name`; ConfigError naming the known ones otherwise."""
    return EXPERT_KERNELS[check_known("expert kernel", name, EXPERT_KERNELS)]
