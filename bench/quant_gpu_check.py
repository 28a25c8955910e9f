"""Quantized expert GEMMs vs bf16 on one Scout-shaped MoE layer (16 experts, hidden 5120,
intermediate 8192, top-1): tokens/s at batch 1 (decode) and 64, the fraction of the HBM roofline
the weight bytes actually read reach (quantized bytes, scales included), the speed-up over bf16,
and each format's error against the bf16 math on its own dequantized weights.

Weights are generated on the device (nothing is read from disk). Self-contained, so the one-command
GPU check can call it:

    python bench/quant_gpu_check.py                 # CUDA: Scout shape, prints the table
    python bench/quant_gpu_check.py --device cpu    # dry run: tiny shape, reference kernel (CI runs it)

Kernels: bf16 through `engine.expert_kernel` `grouped` when registered (else `reference`); FP8 and int4
through `quantized` (model/expert_kernel.py: torch._scaled_grouped_mm / _scaled_mm, and PyTorch's
tinygemm int4 `_weight_int4pack_mm`). On the CPU every format runs the reference kernel.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from model.expert_kernel import EXPERT_KERNELS, expert_kernel
from model.quantization import Fp8Linear, fp8_quantize_rows, module_bytes, quantize_experts

SCOUT = {"experts": 16, "hidden": 5120, "inter": 8192}
TINY = {"experts": 4, "hidden": 256, "inter": 256}
# Peak HBM bandwidth by device name (TB/s, the vendors' figures); --hbm-tbps overrides.
HBM_TBPS = {"H200": 4.8, "H100 SXM": 3.35, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35, "A100": 2.0}


def hbm_tbps(device: str, given: float | None) -> float | None:
    if given is not None or device == "cpu":
        return given
    name = torch.cuda.get_device_name()
    return next((tbps for key, tbps in HBM_TBPS.items() if key in name), None)


def weight_bytes(w) -> int:
    return module_bytes(w) if isinstance(w, torch.nn.Module) else w.numel() * w.element_size()


def routed(batch: int, num_experts: int, device: str) -> torch.Tensor:
    """Expert counts of `batch` top-1 tokens spread round-robin (batch 1: one expert; 64: all of them)."""
    return torch.bincount(torch.arange(batch, device=device) % num_experts, minlength=num_experts)


def time_call(fn, device: str, iters: int) -> float:
    fn()  # warm-up (and the tinygemm layout conversion, once)
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def dense_reference(x: torch.Tensor, counts: torch.Tensor, w1, w2) -> torch.Tensor:
    """fp32 SwiGLU on the dequantized weights of each format (the math every kernel approximates)."""
    def dense(w, e):
        return w.dequantize(e) if isinstance(w, torch.nn.Module) else w[e].float()

    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            gate, up = (x[start:start + n].float() @ dense(w1, e)).chunk(2, dim=-1)
            out.append((torch.nn.functional.silu(gate) * up) @ dense(w2, e))
            start += n
    return torch.cat(out)


def run(device: str, shape: dict, batches: list[int], iters: int, tbps: float | None) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    e, h, i = shape["experts"], shape["hidden"], shape["inter"]
    w1 = (torch.randn(e, h, 2 * i, generator=gen, device=device) * h**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, i, h, generator=gen, device=device) * i**-0.5).to(torch.bfloat16)
    cpu = device == "cpu"
    bf16_kernel = "reference" if cpu else ("grouped" if "grouped" in EXPERT_KERNELS else "reference")
    formats = {"bf16": (w1, w2, bf16_kernel)}
    for mode in ("fp8", "int4"):
        formats[mode] = (quantize_experts(w1, mode), quantize_experts(w2, mode), "reference" if cpu else "quantized")
    rows = []
    for batch in batches:
        counts = routed(batch, e, device)
        x = torch.randn(batch, h, generator=gen, device=device).to(torch.bfloat16)
        base = None
        for name, (a, b, kernel_name) in formats.items():
            kernel = expert_kernel(kernel_name)
            with torch.inference_mode():
                seconds = time_call(lambda k=kernel, a=a, b=b, x=x, c=counts: k(x, c, a, b), device, iters)
                got = kernel(x, counts, a, b).float()
            want = dense_reference(x, counts, a, b)
            used = int((counts > 0).sum())
            nbytes = (weight_bytes(a) + weight_bytes(b)) * used // e  # weights of the experts that have tokens
            base = base or seconds
            row = {"format": name, "kernel": kernel_name, "batch": batch, "tokens_per_s": batch / seconds,
                   "us": seconds * 1e6, "bytes_read": nbytes, "speedup_vs_bf16": base / seconds,
                   "rel_error": float((got - want).norm() / want.norm()),
                   "roofline": nbytes / seconds / (tbps * 1e12) if tbps else None}
            rows.append(row)
    return rows


def fp8_linear_error(device: str, hidden: int, out: int) -> float:
    """An FP8 Linear as Meta's checkpoints store dense layers (`Fp8Linear`: torch._scaled_mm on CUDA)
    vs the same math in fp32 on its dequantized weight: relative error."""
    gen = torch.Generator(device=device).manual_seed(1)
    w = torch.randn(out, hidden, generator=gen, device=device) * hidden**-0.5
    with torch.device("meta"):
        linear = Fp8Linear(hidden, out, bias=False)
    q, scale = fp8_quantize_rows(w)
    linear.weight, linear.weight_scale = q, scale[:, None]
    x = torch.randn(64, hidden, generator=gen, device=device).to(torch.bfloat16)
    with torch.inference_mode():
        got = linear(x).float()
    xq, xs = fp8_quantize_rows(x, linear.activation_scale_ub)
    want = (xq.float() * xs[:, None]) @ (q.float() * scale[:, None]).t()
    return float((got - want).norm() / want.norm())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (Scout shape) or cpu (dry run on a tiny shape)")
    p.add_argument("--batches", default="1,64", help="tokens per call (default 1,64)")
    p.add_argument("--iters", type=int, help="timed calls per case (default 50 on CUDA, 2 on the CPU)")
    p.add_argument("--hbm-tbps", type=float, help="peak HBM bandwidth in TB/s (default: by device name)")
    args = p.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for the dry run", file=sys.stderr)
        return 2
    shape = TINY if args.device == "cpu" else SCOUT
    tbps = hbm_tbps(args.device, args.hbm_tbps)
    iters = args.iters or (2 if args.device == "cpu" else 50)
    rows = run(args.device, shape, [int(b) for b in args.batches.split(",")], iters, tbps)
    where = "CPU dry run (tiny shape, reference kernel)" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"quantized expert GEMMs, one MoE layer {shape} top-1, {where}, HBM peak "
          f"{f'{tbps} TB/s' if tbps else 'unknown (--hbm-tbps)'}")
    print(f"{'format':<6} {'kernel':<10} {'batch':>5} {'tokens/s':>12} {'us/call':>10} {'MB read':>9} "
          f"{'HBM roofline':>12} {'vs bf16':>8} {'rel err':>8}")
    for r in rows:
        roof = f"{r['roofline']:.1%}" if r["roofline"] is not None else "-"
        print(f"{r['format']:<6} {r['kernel']:<10} {r['batch']:>5} {r['tokens_per_s']:>12.1f} {r['us']:>10.1f} "
              f"{r['bytes_read'] / 1e6:>9.1f} {roof:>12} {r['speedup_vs_bf16']:>7.2f}x {r['rel_error']:>8.4f}")
    decode = {r["format"]: r["speedup_vs_bf16"] for r in rows if r["batch"] == min(int(b) for b in
                                                                                     args.batches.split(","))}
    print("decode (smallest batch) speed-up vs bf16: " + ", ".join(f"{k} {v:.2f}x" for k, v in decode.items()))
    linear_error = fp8_linear_error(args.device, shape["hidden"], 2 * shape["inter"])
    print(f"FP8 Linear (dense layers of Meta's FP8 checkpoints), batch 64: rel error {linear_error:.4f} "
          "vs its own dequantized math")
    bad = [r for r in rows if r["rel_error"] > (0.05 if r["format"] != "bf16" else 0.01)]
    for r in bad:
        print(f"ERROR: {r['format']} at batch {r['batch']} is {r['rel_error']:.3f} off its own dequantized math")
    if linear_error > 0.02:
        print(f"ERROR: the FP8 Linear is {linear_error:.3f} off its own dequantized math")
    return 1 if bad or linear_error > 0.02 else 0


if __name__ == "__main__":
    sys.exit(main())

