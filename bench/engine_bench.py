"""Engine benchmark: this engine vs transformers `generate` on the same synthetic checkpoint, in
one run. Prints decode tokens/s at batch 1 and batch N, prefill tokens/s, and the hardware-grounded
figures next to them: weight bytes read per decode step -> achieved GB/s (and the fraction of a
given memory bandwidth), prefill FLOP/s (and MFU against a given peak).

    python bench/engine_bench.py                       # CPU, small-scout
    python bench/engine_bench.py --device cuda --preset scout --num-layers 4 --vocab-size 202048 \
        --peak-tflops 989 --bandwidth-gbs 3350         # H100: Scout-shaped, weights made on the GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.engine.attention.registry import ATTENTION_BACKENDS, AUTO
from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from model.config import TextConfig
from model.device import default_dtype
from model.synth import synthesize


def active_weight_bytes(text: TextConfig, bytes_per_param: int) -> tuple[int, int]:
    """(bytes of weights read by one decode step at batch 1, active parameters per token)."""
    h, kv = text.hidden_size, text.num_key_value_heads * text.head_dim
    attn = h * (text.num_attention_heads * text.head_dim) * 2 + h * kv * 2
    expert = 3 * h * text.intermediate_size
    per_layer = []
    for i in range(text.num_hidden_layers):
        if text.is_moe_layer(i):
            ffn = expert * (1 + text.num_experts_per_tok) + h * text.num_local_experts  # shared + routed + router
        else:
            ffn = 3 * h * text.intermediate_size_mlp
        per_layer.append(attn + ffn)
    params = sum(per_layer) + h * text.vocab_size  # + lm_head (the embedding row read is negligible)
    return params * bytes_per_param, params


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_engine_decode(engine: Engine, prompts: list[list[int]], new_tokens: int, device: str) -> float:
    """Decode tokens/s: time from the first generated token to the last, over all requests."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    while not any(engine.step()):  # prefill until every request has its first token
        pass
    while engine.scheduler.waiting:
        engine.step()
    sync(device)
    start, generated = time.perf_counter(), 0
    while engine.has_unfinished():
        generated += len(engine.step())
    sync(device)
    return generated / (time.perf_counter() - start)


def time_engine_prefill(engine: Engine, prompts: list[list[int]], device: str) -> float:
    """Prefill tokens/s: distinct prompts, so the prefix cache never helps."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for prompt in prompts:
        sync(device)
        start = time.perf_counter()
        engine.generate([prompt], params)
        sync(device)
        times.append(time.perf_counter() - start)
    return len(prompts[0]) / statistics.median(times)


def time_hf_decode(path: Path, prompt: list[int], new_tokens: int, device: str, dtype: torch.dtype) -> float:
    from transformers import Llama4ForConditionalGeneration

    ref = Llama4ForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    lm = ref.language_model
    ids = torch.tensor([prompt], device=device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        lm.generate(ids, max_new_tokens=2, **kw)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        lm.generate(ids, max_new_tokens=1, **kw)
        sync(device)
        t1 = time.perf_counter()
        lm.generate(ids, max_new_tokens=new_tokens + 1, **kw)
        sync(device)
        t2 = time.perf_counter()
    return new_tokens / ((t2 - t1) - (t1 - t0))  # subtract the prefill + first token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small-scout")
    ap.add_argument("--num-layers", type=int)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16, help="the larger decode batch")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the roofline fraction")
    ap.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s for MFU")
    ap.add_argument("--attention-backend", default="reference", choices=[*ATTENTION_BACKENDS, AUTO],
                    help="engine.attention_backend (default reference)")
    args = ap.parse_args()
    dtype = default_dtype(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        cfg = synthesize(path, args.preset, num_layers=args.num_layers, vocab_size=args.vocab_size, dtype=dtype,
                         device=args.device, progress=True)
        run(args, path, cfg.text, dtype)


def run(args, path: Path, text: TextConfig, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    prompt = lambda n: torch.randint(10, 250, (n,), generator=g).tolist()  # noqa: E731
    engine_cfg = EngineConfig(max_num_seqs=max(64, args.batch), max_num_batched_tokens=2048,
                              kv_cache_bytes=(2 * 2**30 if args.device == "cpu" else 16 * 2**30),
                              attention_backend=args.attention_backend)
    engine = Engine.from_pretrained(path, engine_cfg, device=args.device, dtype=dtype)
    nbytes, params = active_weight_bytes(text, torch.empty((), dtype=dtype).element_size())
    rows = []
    for batch in (1, args.batch):
        if args.attention_backend != "reference":  # compile the backend for this batch's step shapes first
            time_engine_decode(engine, [prompt(args.prompt_len) for _ in range(batch)], 2, args.device)
        tps = time_engine_decode(engine, [prompt(args.prompt_len) for _ in range(batch)], args.new_tokens, args.device)
        gbs = nbytes * (tps / batch) / 1e9  # weights are read once per step
        rows.append((f"herd decode, batch {batch}", tps, f"{gbs:.1f} GB/s weights" + _frac(gbs, args.bandwidth_gbs)))
    hf = time_hf_decode(path, prompt(args.prompt_len), args.new_tokens, args.device, dtype)
    rows.append(("transformers generate, batch 1", hf, f"{nbytes * hf / 1e9:.1f} GB/s weights"))
    pre = time_engine_prefill(engine, [prompt(args.prefill_len) for _ in range(3)], args.device)
    tflops = 2 * params * pre / 1e12
    rows.append((f"herd prefill, {args.prefill_len} tokens", pre,
                 f"{tflops:.3f} TFLOP/s" + _frac(tflops, args.peak_tflops)))
    print(f"\n{args.preset} ({text.num_hidden_layers} layers, {params / 1e6:.1f}M active params, "
          f"{nbytes / 2**20:.0f} MiB read per decode step), {args.device}, {dtype}, "
          f"attention {args.attention_backend}")
    for name, tps, hw in rows:
        print(f"  {name:34s} {tps:10.1f} tokens/s   {hw}")
    print(f"  herd / transformers at batch 1: {rows[0][1] / hf:.1f}x")


def _frac(value: float, peak: float | None) -> str:
    return f" ({100 * value / peak:.0f}% of {peak:g})" if peak else ""


if __name__ == "__main__":
    main()
