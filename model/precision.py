"""Where a bf16 model computes in fp32: the numerics policy of the text decoder.

Weights, GEMM inputs, the KV cache, attention and the experts run in the model's dtype (bf16 on a
GPU); these few cheap places run in fp32, as production engines do:

- the residual stream: each decoder layer adds its attention and feed-forward outputs to an fp32
  residual (`residual_dtype`); vLLM and SGLang keep it in bf16 but add in fp32 inside their fused
  add + RMSNorm kernels; Megatron has `fp32_residual_connection`. Cost: `[tokens,
  hidden]` fp32 instead of bf16 per live residual (Scout, 8192-token prefill step: 168 MB instead of
  84 MB) and twice the bytes of the elementwise adds; nothing at decode next to the weights read;
- RMSNorm: statistics, normalization and the weight product in fp32, one rounding to the model's
  dtype at the end (FlashInfer / Triton kernels; transformers and vLLM's reference round before the
  weight product, one rounding more);
- the MoE router: logits, top-k and sigmoid in fp32 (`fp32_linear`; Megatron's `moe_router_dtype`,
  the fp32-output router GEMMs of FlashInfer / SGLang), so near-tied experts are not decided by bf16
  rounding of the logits;
- the output logits: `lm_head` with an fp32 result (`fp32_linear`; SGLang's `--enable-fp32-lm-head`);
  bf16 logits of 10-30 are spaced 0.06-0.125 apart, coarser than many top-1 margins;
- already before: RoPE, QK-norm and query temperature in fp32; sampling on fp32 logits.

In fp32 all of this is the identity (the parity tests against transformers are unchanged).
Measured effect on greedy agreement with fp32, and what is left: bench/RESULTS.md (bf16 section).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def residual_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the residual stream for activations in `dtype`: fp32 for bf16 / fp16, else `dtype`."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` `[..., out]` in fp32: exact products of the given values, fp32 accumulation,
    fp32 result (no rounding of the output to bf16). On CUDA one bf16 GEMM with an fp32 output
    (`torch.mm(..., out_dtype=)`, torch >= 2.8); elsewhere the operands are widened first (exact)."""
    if x.dtype == weight.dtype == torch.float32:
        return F.linear(x, weight)
    if x.is_cuda and x.dtype == weight.dtype and x.dtype in _LOW_PRECISION:
        try:
            return torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32).view(*x.shape[:-1], -1)
        except (RuntimeError, TypeError):  # a torch or GPU without the fp32-output GEMM: widen (exact, slower)
            pass
    return F.linear(x.float(), weight.float())
