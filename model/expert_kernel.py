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

Weights: `gate_up_proj` / `down_proj` are the dense stacked tensors, or, when the experts are quantized
(`experts.quantization`, or an FP8 checkpoint), the small weight modules of model/quantization.py
(`Fp8ExpertWeights`, `Int4ExpertWeights`) in their place. `reference` runs every format (dequantize,
then matmul); `quantized` runs them on CUDA with library kernels; `grouped` takes dense tensors and
hands quantized ones to the reference.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from model.errors import check_known
from model.fusion import realize
from model.quantization import ExpertWeight, Fp8ExpertWeights, Int4ExpertWeights, expert_matmul, fp8_quantize_rows


class ExpertKernel(Protocol):
    def __call__(self, x: torch.Tensor, counts: torch.Tensor, gate_up_proj: ExpertWeight,
                 down_proj: ExpertWeight) -> torch.Tensor:
        """SwiGLU experts on rows sorted by expert: `x` `[N, hidden]`, `counts` `[E]` (int64, on
        x's device, sums to at most N; rows of expert e follow those of e - 1; rows past the sum are
        padding whose output is dropped), `gate_up_proj` `[E, hidden, 2 * inter]` (gate columns
        first), `down_proj` `[E, inter, hidden]` (dense tensors or quantized weights of those shapes)
        -> `[N, hidden]`."""
        ...


def expert_swiglu(x: torch.Tensor, gate_up_proj: ExpertWeight, down_proj: ExpertWeight, expert: int) -> torch.Tensor:
    """Expert `expert` (index into the stacked weights) on rows `x` `[n, hidden]`: down(silu(gate) * up),
    the reference math of every weight format (`expert_matmul`)."""
    gate, up = expert_matmul(x, gate_up_proj, expert).chunk(2, dim=-1)  # [n, inter] each
    return expert_matmul(F.silu(gate) * up, down_proj, expert)  # [n, hidden]


def reference_kernel(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: ExpertWeight,
                     down_proj: ExpertWeight) -> torch.Tensor:
    """One matmul pair per expert that has rows (exact on the CPU; one host sync for the counts:
    the yardstick, not the fast path). Quantized weights are dequantized per expert (FP8
    activations quantized per row first)."""
    sizes = counts.tolist()
    padding = x.shape[0] - sum(sizes)
    outputs = []
    for e, rows in enumerate(x.split([*sizes, padding])[: len(sizes)]):
        if sizes[e]:
            outputs.append(expert_swiglu(rows, gate_up_proj, down_proj, e))
    outputs.append(x.new_zeros(padding, x.shape[1]))
    return torch.cat(outputs)


# F.grouped_mm is the public name (torch >= 2.10); both call aten::_grouped_mm.
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


@torch.library.custom_op("herd::grouped_experts", mutates_args=())
def grouped_experts(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor,
                    down_proj: torch.Tensor) -> torch.Tensor:
    """`grouped_kernel` on dense weights as one opaque op: what a compiled step calls where
    `_grouped_mm` itself does not trace (no fp32 meta kernel), so the step still compiles whole."""
    return _grouped(x, counts, gate_up_proj, down_proj)


@grouped_experts.register_fake
def _grouped_experts_shape(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor,
                           down_proj: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], down_proj.shape[2])


# Under torch.compile on the CPU, up to this many rows (decode steps: batch x top-k) run `_per_row`:
# measured on 2 cores, small-scout widths (hidden 256, inter 256, 16 experts), 8 layers: 6-9 ms at 64
# rows vs 11 ms through `_grouped_mm` (whose per-expert GEMMs of ~4 rows are far from the memory
# floor, ~3 ms), 3 vs 9 ms at 16 rows, even at 128 rows, slower from 256 (bench/RESULTS.md).
PER_ROW_MAX_ROWS = 128


def _per_row(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
             ) -> torch.Tensor:
    """Each row times its own expert's weights, written as a gather + multiply + sum that inductor
    fuses into one loop per projection (the weights are read in place, never gathered into a copy;
    rows of one expert are adjacent, so its weights are still in cache for the next row). For
    compiled CPU decode steps only: eager, the gather materializes `[N, hidden, 2 * inter]`."""
    ends = counts.cumsum(0)
    rows = torch.arange(x.shape[0], device=x.device)
    expert = torch.searchsorted(ends, rows, right=True).clamp(max=counts.numel() - 1)  # padding: any expert
    x, expert = realize(x), realize(expert)  # not recomputed inside the sums' loops (model/fusion.py)
    gate, up = (x[:, :, None] * gate_up_proj[expert]).sum(1).chunk(2, dim=-1)  # [N, inter] each
    act = realize(F.silu(gate) * up)
    return (act[:, :, None] * down_proj[expert]).sum(1)  # [N, hidden]


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same `[E, K, N]` values, each expert's matrix stored column-major (K contiguous): the layout
    `_per_row` reads fastest, its sums running along memory (measured 1.5x at 16-64 rows on 2 cores:
    row-major, every step of a sum lands on another cache line and page); `_grouped_mm`'s prefill
    GEMMs (thousands of rows) run as fast on either. `Engine` stores the routed experts so when its
    steps compile on the CPU."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


def _grouped(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
             ) -> torch.Tensor:
    offs = counts.cumsum(0, dtype=torch.int32)  # [E] end row of each expert
    gate, up = _grouped_mm(x, gate_up_proj, offs=offs).chunk(2, dim=-1)  # [N, inter] each
    return _grouped_mm(F.silu(gate) * up, down_proj, offs=offs)  # [N, hidden]


def grouped_kernel(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: ExpertWeight,
                   down_proj: ExpertWeight) -> torch.Tensor:
    """Two grouped GEMMs (gate/up, then down) over every expert at once, the group boundaries
    as device-side int32 offsets: no host sync, one call per projection whatever the number of
    experts hit, and only the weights of experts that have rows are read (empty groups are
    skipped), so small decode batches need no gather of the chosen experts' weights. Exact
    against `reference_kernel` in fp32 on the CPU (the same matmul per group). On CUDA the fast
    path (CUTLASS) takes bf16 on sm90/sm100; other dtypes use torch's per-group fallback, which
    copies the offsets to the host. Quantized weights go to the reference (or `quantized`).
    Under torch.compile: on the CPU, up to `PER_ROW_MAX_ROWS` rows, the fused `_per_row`; otherwise,
    in dtypes other than bf16/fp16 (which `_grouped_mm` traces in), the opaque op `herd::grouped_experts`."""
    if not (isinstance(gate_up_proj, torch.Tensor) and isinstance(down_proj, torch.Tensor)):
        return reference_kernel(x, counts, gate_up_proj, down_proj)
    if torch.compiler.is_compiling():
        if x.device.type == "cpu" and x.shape[0] <= PER_ROW_MAX_ROWS:
            return _per_row(x, counts, gate_up_proj, down_proj)
        if x.dtype not in (torch.bfloat16, torch.float16):
            return grouped_experts(x, counts, gate_up_proj, down_proj)
    return _grouped(x, counts, gate_up_proj, down_proj)


def quantized_kernel(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: ExpertWeight,
                     down_proj: ExpertWeight) -> torch.Tensor:
    """Quantized experts on CUDA: FP8 with `torch._scaled_grouped_mm` (one grouped GEMM per
    projection, row-wise scales; per-expert `torch._scaled_mm` where the grouped op is missing) and
    int4 with PyTorch's tinygemm kernel (`torch.ops.aten._weight_int4pack_mm`, the kernel behind
    torchao's int4 weight-only; per expert: it has no grouped form). Anywhere else, or for dense
    weights, the reference."""
    if isinstance(gate_up_proj, torch.Tensor) and isinstance(down_proj, torch.Tensor):
        return grouped_kernel(x, counts, gate_up_proj, down_proj) if x.is_cuda else reference_kernel(
            x, counts, gate_up_proj, down_proj)
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
    split = [*sizes, x.shape[0] - sum(sizes)]  # the last part: padding rows (output dropped)
    outputs = [torch._scaled_mm(qe, w.weight[e].t(), scale_a=se[:, None], scale_b=w.scale[e][None, :],
                                out_dtype=torch.bfloat16)
               for e, (qe, se) in enumerate(zip(q.split(split)[:-1], scale.split(split)[:-1], strict=True))
               if sizes[e]]
    outputs.append(x.new_zeros(split[-1], w.shape[2], dtype=torch.bfloat16))
    return torch.cat(outputs)


def int4_per_expert(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: Int4ExpertWeights,
                    down_proj: Int4ExpertWeights) -> torch.Tensor:
    """int4 weight-only experts with `torch.ops.aten._weight_int4pack_mm` (bf16 activations)."""
    sizes = counts.tolist()
    padding = x.shape[0] - sum(sizes)
    xb = x.to(torch.bfloat16)
    outputs = []
    for e, rows in enumerate(xb.split([*sizes, padding])[: len(sizes)]):
        if sizes[e]:
            packed, sz = gate_up_proj.tinygemm(e)
            gate, up = torch.ops.aten._weight_int4pack_mm(rows, packed, gate_up_proj.group_size, sz).chunk(2, dim=-1)
            packed, sz = down_proj.tinygemm(e)
            outputs.append(torch.ops.aten._weight_int4pack_mm(F.silu(gate) * up, packed, down_proj.group_size, sz))
    outputs.append(xb.new_zeros(padding, x.shape[1]))
    return torch.cat(outputs).to(x.dtype)

EXPERT_KERNELS: dict[str, ExpertKernel] = {"reference": reference_kernel, "grouped": grouped_kernel,
                                           "quantized": quantized_kernel}


KERNEL_CHOICES = (*EXPERT_KERNELS, "auto")
"""What a config may name: a registered kernel, or `auto` (see `resolve_expert_kernel`)."""


def resolve_expert_kernel(name: str, device: torch.device | str, quantized: bool = False) -> str:
    """`auto` -> on CUDA `quantized` for quantized experts and `grouped` otherwise; `reference`
    elsewhere (the CPU default the tests compare against); any other name is checked and returned
    as it is."""
    if name == "auto":
        if torch.device(device).type != "cuda":
            return "reference"
        return "quantized" if quantized else "grouped"
    return check_known("expert kernel", name, EXPERT_KERNELS)


def expert_kernel(name: str) -> ExpertKernel:
    """The kernel registered under `name`; ConfigError naming the known ones otherwise."""
    return EXPERT_KERNELS[check_known("expert kernel", name, EXPERT_KERNELS)]
