"""Quantized weights: FP8 (e4m3, per output channel) and int4 (weight-only, group-wise), for the routed
experts (quantized at load, `experts.quantization`) and for the FP8 checkpoints Meta releases.

**Meta's FP8 format** (`quantization_config.quant_method: fbgemm_fp8`), as transformers' own
integration reads and writes it (`transformers/integrations/fbgemm_fp8.py`, `FbgemmFp8Quantize`,
`FbgemmFp8Llama4TextExperts`, `FbgemmFp8Linear`; `quantizers/quantizer_fbgemm_fp8.py`):

- every `nn.Linear` and every `Llama4TextExperts` whose module name no `modules_to_not_convert`
  pattern matches (`should_convert`) is stored in `float8_e4m3fn` with fp32 scales, one per output
  channel, `w ~= w_fp8 * scale` (fbgemm's `quantize_fp8_per_row` on the rows of `[out, in]`):
  - a Linear: `X.weight` `[out, in]` fp8 and `X.weight_scale` `[out, 1]` fp32;
  - routed experts: `experts.gate_up_proj` `[E, hidden, 2 * inter]` fp8 (the bf16 layout) with
    `experts.gate_up_proj_scale` `[E, 1, 2 * inter]`, and `experts.down_proj` `[E, inter, hidden]`
    fp8 with `experts.down_proj_scale` `[E, hidden, 1]` (both per output column);
- activations are quantized per token (row) at run time, the row max clamped to
  `activation_scale_ub` (1200.0 by default): `x ~= x_fp8 * x_scale`; the GEMM is
  `(x_fp8 @ w_fp8) * x_scale * w_scale` in fp32, output in bf16. Both expert GEMMs quantize their
  input (the down projection quantizes silu(gate) * up).

**int4** (ours; no checkpoint format): symmetric, group-wise along the input dimension (`group_size`
128, or the largest divisor of the input size up to 128 on tiny models), bf16 scales, q in -7..7
stored as q + 8 in a nibble, two per byte (the even input index in the high nibble: the layout
PyTorch's tinygemm int4 kernel, `torch.ops.aten._convert_weight_to_int4pack`, takes per expert),
so `w ~= (nibble - 8) * scale`.

Held in the model as small modules (`Fp8ExpertWeights`, `Int4ExpertWeights`, `Fp8Linear`) in place
of the dense tensors: an expert kernel (model/expert_kernel.py) is given them where it would get
`gate_up_proj` / `down_proj` tensors, and `expert_matmul` is the one reference for their math.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.errors import ConfigError, check_known

QUANTIZATIONS = ("none", "fp8", "int4")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(float8_e4m3fn).max
DEFAULT_ACTIVATION_SCALE_UB = 1200.0  # transformers' FbgemmFp8Config default
INT4_GROUP = 128
FBGEMM_FP8 = "fbgemm_fp8"


# ---- FP8 ------------------------------------------------------------------------------------------
def fp8_quantize_rows(x: torch.Tensor, scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fbgemm's `quantize_fp8_per_row` on the last dimension (its reference math): `(x_fp8, scale)`
    with `x ~= x_fp8 * scale[..., None]`; the row's inverse scale is 448 / max|row| (the row max
    clamped to `scale_ub` when given, as for activations; at most 448 * 512), scale its reciprocal, fp32."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    inv = (FP8_MAX / amax).clamp(max=FP8_MAX * 512.0)
    q = (x.float() * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, (1.0 / inv).squeeze(-1)


def fp8_fake_quantize_rows(x: torch.Tensor, scale_ub: float | None) -> torch.Tensor:
    """`x` through per-row FP8 and back, in fp32: what an FP8 GEMM sees of its activations."""
    q, scale = fp8_quantize_rows(x, scale_ub)
    return q.float() * scale[..., None]


class Fp8ExpertWeights(nn.Module):
    """One stacked expert weight `[E, K, N]` (K input, N output) in FP8: `weight` `[E, N, K]` e4m3
    (transposed once at load: each expert's `[N, K]` rows are the column-major `[K, N]` operand that
    `torch._scaled_mm` / `torch._scaled_grouped_mm` take without a copy) and `scale` `[E, N]` fp32."""

    weight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, num_experts: int, in_features: int, out_features: int,
                 activation_scale_ub: float = DEFAULT_ACTIVATION_SCALE_UB):
        super().__init__()
        self.shape = (num_experts, in_features, out_features)
        self.activation_scale_ub = activation_scale_ub
        self.register_buffer("weight", torch.empty(num_experts, out_features, in_features, dtype=FP8))
        self.register_buffer("scale", torch.empty(num_experts, out_features, dtype=torch.float32))

    @classmethod
    def quantize(cls, w: torch.Tensor, activation_scale_ub: float = DEFAULT_ACTIVATION_SCALE_UB) -> Fp8ExpertWeights:
        """From a dense `[E, K, N]` (per output channel, expert by expert to bound temporary memory)."""
        e, k, n = w.shape
        with torch.device("meta"):
            out = cls(e, k, n, activation_scale_ub)
        weight = torch.empty(e, n, k, dtype=FP8, device=w.device)
        scale = torch.empty(e, n, dtype=torch.float32, device=w.device)
        for i in range(e):
            weight[i], scale[i] = fp8_quantize_rows(w[i].t())
        out.weight, out.scale = weight, scale
        return out

    @classmethod
    def from_fbgemm(cls, weight: torch.Tensor, scale: torch.Tensor,
                    activation_scale_ub: float) -> Fp8ExpertWeights:
        """From Meta's tensors: `weight` `[E, K, N]` fp8 and its scale (`[E, 1, N]` for gate_up_proj,
        `[E, N, 1]` for down_proj; shapes checked by the caller)."""
        e, k, n = weight.shape
        with torch.device("meta"):
            out = cls(e, k, n, activation_scale_ub)
        out.weight, out.scale = weight.transpose(1, 2).contiguous(), scale.reshape(e, n).float()
        return out

    def dequantize(self, expert: int) -> torch.Tensor:
        """Expert `expert`'s `[K, N]` in fp32."""
        return (self.weight[expert].float() * self.scale[expert, :, None]).t()

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, fp8 e4m3, fp32 channel scales, scale_ub={self.activation_scale_ub}"


class Fp8Linear(nn.Module):
    """An `nn.Linear` stored as in Meta's FP8 checkpoints (`FbgemmFp8Linear`): `weight` `[out, in]`
    e4m3, `weight_scale` `[out, 1]` fp32, activations quantized per token. On CUDA the GEMM is
    `torch._scaled_mm` (row-wise scales); elsewhere the fp32 reference of the same math."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 activation_scale_ub: float = DEFAULT_ACTIVATION_SCALE_UB):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation_scale_ub = activation_scale_ub
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.is_cuda:
            q, scale = fp8_quantize_rows(rows, self.activation_scale_ub)
            y = torch._scaled_mm(q, self.weight.t(), scale_a=scale[:, None], scale_b=self.weight_scale.t(),
                                 out_dtype=torch.bfloat16).to(x.dtype)
        else:
            xf = fp8_fake_quantize_rows(rows, self.activation_scale_ub)
            y = (xf @ (self.weight.float() * self.weight_scale).t()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


# ---- int4 -----------------------------------------------------------------------------------------
def int4_group_size(in_features: int, group_size: int = INT4_GROUP) -> int:
    """`group_size` when it divides `in_features`, else the largest even divisor below it (tiny models)."""
    for g in range(min(group_size, in_features), 1, -1):
        if in_features % g == 0 and g % 2 == 0:
            return g
    raise ConfigError(f"int4 quantization needs an even input size, got {in_features}")


class Int4ExpertWeights(nn.Module):
    """One stacked expert weight `[E, K, N]` in int4: `packed` `[E, N, K // 2]` uint8 (two nibbles
    per byte, even k high) and `scale` `[E, K // group_size, N]` bf16; `w ~= (nibble - 8) * scale`."""

    packed: torch.Tensor
    scale: torch.Tensor

    def __init__(self, num_experts: int, in_features: int, out_features: int, group_size: int | None = None):
        super().__init__()
        self.shape = (num_experts, in_features, out_features)
        self.group_size = group_size or int4_group_size(in_features)
        self.register_buffer("packed", torch.empty(num_experts, out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.empty(num_experts, in_features // self.group_size, out_features,
                                                  dtype=torch.bfloat16))
        self._tinygemm: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # CUDA layout, made on first use

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int | None = None) -> Int4ExpertWeights:
        """From a dense `[E, K, N]`, expert by expert (bounded temporary memory)."""
        e, k, n = w.shape
        with torch.device("meta"):
            out = cls(e, k, n, group_size)
        g = out.group_size
        packed = torch.empty(e, n, k // 2, dtype=torch.uint8, device=w.device)
        scale = torch.empty(e, k // g, n, dtype=torch.bfloat16, device=w.device)
        for i in range(e):
            groups = w[i].float().reshape(k // g, g, n)
            s = (groups.abs().amax(dim=1) / 7.0).to(torch.bfloat16)  # [K/g, N]; bf16 as stored
            sf = s.float().clamp(min=torch.finfo(torch.bfloat16).tiny)
            q = (torch.round(groups / sf[:, None, :]).clamp(-7, 7) + 8).to(torch.uint8).reshape(k, n).t()  # [N, K]
            packed[i] = (q[:, 0::2] << 4) | q[:, 1::2]
            scale[i] = s
        out.packed, out.scale = packed, scale
        return out

    def nibbles(self, expert: int) -> torch.Tensor:
        """Expert `expert`'s stored values `[N, K]` in 0..15 (uint8)."""
        p = self.packed[expert]
        return torch.stack([p >> 4, p & 0xF], dim=-1).reshape(p.shape[0], -1)

    def dequantize(self, expert: int) -> torch.Tensor:
        """Expert `expert`'s `[K, N]` in fp32."""
        q = self.nibbles(expert).t().float() - 8.0  # [K, N]
        return q * self.scale[expert].float().repeat_interleave(self.group_size, dim=0)

    def tinygemm(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert `expert` as `torch.ops.aten._weight_int4pack_mm` takes it on CUDA: (packed int4
        tiles, scales_and_zeros `[K/g, N, 2]` bf16 with zeros 0). Converted once per expert and
        cached; the canonical `packed` stays the source of truth (and of `dequantize`)."""
        if self._tinygemm is None:
            k = self.shape[1]
            inner = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
            if inner is None or self.group_size not in (32, 64, 128, 256):
                raise ConfigError(f"int4 experts of input size {k} (group {self.group_size}) do not fit PyTorch's "
                                  "tinygemm kernel (a multiple of 32 inputs, groups of 32-256): use kernel reference")
            self._tinygemm = [
                (torch.ops.aten._convert_weight_to_int4pack(self.packed[e].contiguous(), inner),
                 torch.stack([self.scale[e], torch.zeros_like(self.scale[e])], dim=-1).contiguous())
                for e in range(self.shape[0])
            ]
        return self._tinygemm[expert]

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, int4 group {self.group_size}, bf16 scales"


QuantizedExpertWeights = Fp8ExpertWeights | Int4ExpertWeights
ExpertWeight = torch.Tensor | Fp8ExpertWeights | Int4ExpertWeights


def expert_matmul(x: torch.Tensor, w: ExpertWeight, expert: int) -> torch.Tensor:
    """`x` `[n, K]` times expert `expert` of `w` (`[E, K, N]` dense, or quantized) -> `[n, N]` in
    `x.dtype`: the reference math of every format (FP8 quantizes `x` per row first)."""
    if isinstance(w, Fp8ExpertWeights):
        return (fp8_fake_quantize_rows(x, w.activation_scale_ub) @ w.dequantize(expert)).to(x.dtype)
    if isinstance(w, Int4ExpertWeights):
        return (x.float() @ w.dequantize(expert)).to(x.dtype)
    return x @ w[expert]


def quantize_experts(w: torch.Tensor, mode: str) -> ExpertWeight:
    """A dense stacked expert weight `[E, K, N]` in `mode` ('none' returns it as is)."""
    check_known("expert quantization", mode, QUANTIZATIONS)
    if mode == "fp8":
        return Fp8ExpertWeights.quantize(w)
    if mode == "int4":
        return Int4ExpertWeights.quantize(w)
    return w


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (scales included)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def expert_weight_bytes(num_experts: int, in_features: int, out_features: int, mode: str,
                        dense_itemsize: int = 2) -> int:
    """Bytes one stacked expert weight `[E, K, N]` takes in `mode`, scales included (what `herd plan` counts)."""
    e, k, n = num_experts, in_features, out_features
    if mode == "fp8":
        return e * k * n + e * n * 4
    if mode == "int4":
        return e * k * n // 2 + e * (k // int4_group_size(k)) * n * 2
    return e * k * n * dense_itemsize


# ---- Meta's checkpoint config -----------------------------------------------------------------------
def should_convert(module_name: str, patterns: list[str] | None) -> bool:
    """transformers' `should_convert_module`: a module is quantized unless a `modules_to_not_convert`
    pattern matches its name from the start up to a module boundary (as a regex), or as a suffix."""
    if patterns is None:
        return True
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", module_name) or module_name.endswith(key) for key in patterns)


@dataclass(frozen=True)
class Fp8CheckpointConfig:
    """A checkpoint's `quantization_config` in Meta's FP8 format."""

    activation_scale_ub: float = DEFAULT_ACTIVATION_SCALE_UB
    modules_to_not_convert: list[str] | None = field(default=None, hash=False)

    def to_hf_dict(self) -> dict:
        return {"quant_method": FBGEMM_FP8, "activation_scale_ub": self.activation_scale_ub,
                "modules_to_not_convert": self.modules_to_not_convert}


def checkpoint_quantization(path: str | Path) -> Fp8CheckpointConfig | None:
    """The quantization of the checkpoint at `path` (config.json's `quantization_config`): None for
    plain bf16/fp32 weights, an `Fp8CheckpointConfig` for Meta's FP8; ConfigError for any other method."""
    data = json.loads((Path(path) / "config.json").read_text())
    qc = data.get("quantization_config") or (data.get("text_config") or {}).get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != FBGEMM_FP8:
        raise ConfigError(f"{path}: quantization_config.quant_method {method!r} is not supported "
                          f"(Herd loads {FBGEMM_FP8!r}, Meta's FP8 format, and bf16/fp32 checkpoints)")
    ub = qc.get("activation_scale_ub", DEFAULT_ACTIVATION_SCALE_UB)
    if not isinstance(ub, int | float) or ub <= 0:
        raise ConfigError(f"{path}: quantization_config.activation_scale_ub must be a positive number, got {ub!r}")
    skip = qc.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise ConfigError(f"{path}: quantization_config.modules_to_not_convert must be a list of strings")
    return Fp8CheckpointConfig(float(ub), skip)


def served_expert_quantization(requested: str, checkpoint: Fp8CheckpointConfig | None) -> str:
    """What the routed experts run in: `requested` (none | fp8 | int4) for a bf16/fp32 checkpoint;
    fp8 for an FP8 checkpoint (which is served as such: 'none' and 'fp8' both mean that, int4 is refused)."""
    check_known("expert quantization", requested, QUANTIZATIONS)
    if checkpoint is None:
        return requested
    if requested == "int4":
        raise ConfigError("the checkpoint is FP8 (quantization_config fbgemm_fp8): it is served in FP8; "
                          "set the expert quantization to fp8 or none, or use a bf16 checkpoint for int4")
    return "fp8"
