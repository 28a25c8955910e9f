"""Expert kernels: the math of the routed experts, swappable behind one interface.

`Experts` (model/moe.py) picks the (token, choice) pairs it owns, scales each token by its gate
score and sorts the rows by expert; a kernel then runs every expert on its contiguous run of rows.
Kernels differ only in how (a Python loop of matmuls here; grouped GEMM or quantized kernels later)
and are chosen by name (`experts.kernel` in the config), so model code never imports a concrete one.

Weights: `gate_up_proj` / `down_proj` are the dense stacked tensors, or, when the experts are quantized
(`experts.quantization`, or an FP8 checkpoint), the small weight modules of model/quantization.py
(`Fp8ExpertWeights`, `Int4ExpertWeights`) in their place. A kernel that takes only dense tensors
leaves quantized ones to `expert_matmul` (the reference math of every format); `quantized` runs them
on CUDA with library kernels.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from model.errors import check_known
from model.quantization import ExpertWeight, Fp8ExpertWeights, Int4ExpertWeights, expert_matmul, fp8_quantize_rows


class ExpertKernel(Protocol):
    def __call__(self, x: torch.Tensor, counts: torch.Tensor, gate_up_proj: ExpertWeight,
                 down_proj: ExpertWeight) -> torch.Tensor:
        """SwiGLU experts on rows sorted by expert: `x` `[N, hidden]`, `counts` `[E]` (int64, sums
        to N; rows of expert e follow those of e - 1), `gate_up_proj` `[E, hidden, 2 * inter]` (gate
        columns first), `down_proj` `[E, inter, hidden]` (dense tensors or quantized weights of
        those shapes) -> `[N, hidden]`."""
        ...


def reference_kernel(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: ExpertWeight,
                     down_proj: ExpertWeight) -> torch.Tensor:
    """One matmul pair per expert that has rows (exact on the CPU; one host sync for the counts).
    Quantized weights are dequantized per expert (FP8 activations quantized per row first)."""
    sizes = counts.tolist()
    outputs = []
    for e, rows in enumerate(x.split(sizes)):
        if sizes[e]:
            gate, up = expert_matmul(rows, gate_up_proj, e).chunk(2, dim=-1)  # [n, inter] each
            outputs.append(expert_matmul(F.silu(gate) * up, down_proj, e))  # [n, hidden]
    return torch.cat(outputs) if outputs else x.new_zeros(0, x.shape[1])


def quantized_kernel(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: ExpertWeight,
                     down_proj: ExpertWeight) -> torch.Tensor:
    """Quantized experts on CUDA: FP8 with `torch._scaled_grouped_mm` (one grouped GEMM per
    projection, row-wise scales; per-expert `torch._scaled_mm` where the grouped op is missing) and
    int4 with PyTorch's tinygemm kernel (`torch.ops.aten._weight_int4pack_mm`, the kernel behind
    torchao's int4 weight-only; per expert: it has no grouped form). Anywhere else, or for dense
    weights, the reference."""
    if not x.is_cuda or type(gate_up_proj) is not type(down_proj):
        return reference_kernel(x, counts, gate_up_proj, down_proj)
    if isinstance(gate_up_proj, Fp8ExpertWeights):
        assert isinstance(down_proj, Fp8ExpertWeights)
        grouped = fp8_grouped if hasattr(torch, "_scaled_grouped_mm") else fp8_per_expert
        gate, up = grouped(x, counts, gate_up_proj).chunk(2, dim=-1)
        return grouped(F.silu(gate) * up, counts, down_proj).to(x.dtype)
    if isinstance(gate_up_proj, Int4ExpertWeights):
        assert isinstance(down_proj, Int4ExpertWeights)
        return int4_per_expert(x, counts, gate_up_proj, down_proj)
    return reference_kernel(x, counts, gate_up_proj, down_proj)


def fp8_grouped(x: torch.Tensor, counts: torch.Tensor, w: Fp8ExpertWeights) -> torch.Tensor:
    """`[N, K]` rows sorted by expert -> `[N, N_out]` bf16 through one `torch._scaled_grouped_mm` (CUDA, sm90+)."""
    q, scale = fp8_quantize_rows(x, w.activation_scale_ub)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return torch._scaled_grouped_mm(q, w.weight.transpose(-2, -1), scale, w.scale, offs=offs,
                                    out_dtype=torch.bfloat16)


def fp8_per_expert(x: torch.Tensor, counts: torch.Tensor, w: Fp8ExpertWeights) -> torch.Tensor:
    """The same with one `torch._scaled_mm` per expert that has rows (row-wise scales)."""
    q, scale = fp8_quantize_rows(x, w.activation_scale_ub)
    sizes = counts.tolist()
    outputs = [torch._scaled_mm(qe, w.weight[e].t(), scale_a=se[:, None], scale_b=w.scale[e][None, :],
                                out_dtype=torch.bfloat16)
               for e, (qe, se) in enumerate(zip(q.split(sizes), scale.split(sizes), strict=True)) if sizes[e]]
    return torch.cat(outputs) if outputs else x.new_zeros(0, w.shape[2], dtype=torch.bfloat16)


def int4_per_expert(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: Int4ExpertWeights,
                    down_proj: Int4ExpertWeights) -> torch.Tensor:
    """int4 weight-only experts with `torch.ops.aten._weight_int4pack_mm` (bf16 activations)."""
    sizes = counts.tolist()
    xb = x.to(torch.bfloat16)
    outputs = []
    for e, rows in enumerate(xb.split(sizes)):
        if sizes[e]:
            packed, sz = gate_up_proj.tinygemm(e)
            gate, up = torch.ops.aten._weight_int4pack_mm(rows, packed, gate_up_proj.group_size, sz).chunk(2, dim=-1)
            packed, sz = down_proj.tinygemm(e)
            outputs.append(torch.ops.aten._weight_int4pack_mm(F.silu(gate) * up, packed, down_proj.group_size, sz))
    return (torch.cat(outputs) if outputs else xb.new_zeros(0, x.shape[1])).to(x.dtype)


EXPERT_KERNELS: dict[str, ExpertKernel] = {"reference": reference_kernel, "quantized": quantized_kernel}


def expert_kernel(name: str) -> ExpertKernel:
    """The kernel registered under `name`; ConfigError naming the known ones otherwise."""
    return EXPERT_KERNELS[check_known("expert kernel", name, EXPERT_KERNELS)]
