"""`make gpu-check`: the engine's GPU figures in one command, on a bare GPU machine (torch,
transformers, safetensors and tokenizers there; pydantic carried, see the Makefile).

Sections, in order (`SECTIONS`; another piece of work adds its own with `section`, e.g. FP8 or
int4 expert GEMMs, and it runs in the same check and lands in the same JSON):
- `parity`: the fast path (`bench/engine_bench.PATHS["fast"]`, compiled as the engine compiles on
  the device) against the reference path and transformers on tiny Scout-like and Maverick-like
  checkpoints: fp32 greedy tokens equal and the largest logprob difference; bf16 greedy agreement
  with fp32.
- `decode`: a Scout-shaped model (hidden 5120, 40/8 heads, 16 experts, vocab 202048; `--num-layers`)
  whose weights are generated on the device (nothing read from disk), decode tokens/s at batch 1
  and 64 and their fraction of the HBM roofline (weight bytes touched per step / peak bandwidth).
- `prefill`: one 8k-token prompt, MFU against the device's dense bf16 peak.
- `transformers`: `Llama4ForCausalLM.generate` on the same weight tensors (shared, not copied), batch 1.
- `quantized_experts`: FP8 and int4 routed-expert GEMMs against bf16 on a Scout-shaped MoE layer
  (bench/quant_gpu_check.py): tokens/s, HBM roofline fraction of the quantized bytes, speed-up.

    python bench/gpu_check.py                       # on the GPU: Scout-shaped, 4 layers
    python bench/gpu_check.py --device cpu --tiny   # the dry run CI runs (tiny model, seconds)

Writes `--out`/gpu_check.json and gpu_check_row.md (a bench/RESULTS.md-ready table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_bench import engine_options
from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from model.config import Llama4Config, TextConfig
from model.llama4 import Llama4
from model.presets import SpecialIds, preset
from model.synth import init_tensor, synthesize
from model.synth_tokenizer import write_synthetic_tokenizer
from model.tokenizer import Tokenizer

# (peak HBM bandwidth GB/s, dense bf16 TFLOP/s) by a substring of torch.cuda.get_device_name()
DEVICE_PEAKS = {"H200": (4800.0, 989.0), "H100": (3350.0, 989.0), "A100": (2039.0, 312.0)}
SCOUT_VOCAB = 202048


@dataclass
class Check:
    """What every section gets: the run's settings, the models built so far, and the results."""

    args: argparse.Namespace
    device: str
    tmp: Path
    bandwidth_gbs: float | None
    peak_tflops: float | None
    results: dict = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (what, figure, vs peak / target)
    shared: dict = field(default_factory=dict)  # e.g. "scout": (model, tokenizer), built once

    def row(self, what: str, figure: str, note: str = "") -> None:
        self.rows.append((what, figure, note))
        print(f"  {what:48s} {figure:>22s}  {note}", flush=True)


SECTIONS: dict[str, Callable[[Check], dict]] = {}


def section(name: str) -> Callable[[Callable[[Check], dict]], Callable[[Check], dict]]:
    """Register a section (run in registration order); its dict lands under `name` in the JSON."""

    def register(fn: Callable[[Check], dict]) -> Callable[[Check], dict]:
        SECTIONS[name] = fn
        return fn

    return register


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fast_options() -> dict:
    return engine_options("fast")[0]


def build_model(cfg: Llama4Config, device: str, dtype: torch.dtype, seed: int = 0) -> Llama4:
    """A text-only Llama 4 with synthetic weights made tensor by tensor on `device` (as `herd synth`
    would write them), never on disk."""
    cfg = replace(cfg, vision=None)
    kernel = fast_options().get("expert_kernel", "reference")
    with torch.device("meta"):
        model = Llama4(cfg, None, kernel)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        state[name] = init_tensor(name, tuple(p.shape), gen, torch.device(device)).to(dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def scout_config(num_layers: int, tok: Tokenizer, vocab: int, tiny: bool) -> Llama4Config:
    ids = SpecialIds.from_tokenizer(tok)
    ids = replace(ids, vocab_size=max(vocab, ids.vocab_size))
    return preset("tiny-scout" if tiny else "scout", ids, num_layers=num_layers)


def weights_touched(text: TextConfig, batch: int, bytes_per_param: int) -> int:
    """Weight bytes one decode step of `batch` tokens reads: attention, router, shared expert and
    lm_head once, and every routed expert some token picks (expected distinct experts under uniform
    routing: E * (1 - (1 - k/E)^batch))."""
    h, hd = text.hidden_size, text.head_dim
    attn = h * hd * (2 * text.num_attention_heads + 2 * text.num_key_value_heads)
    expert = 3 * h * text.intermediate_size
    e, k = text.num_local_experts, text.num_experts_per_tok
    hit = e * (1 - (1 - k / e) ** batch)
    total = h * text.vocab_size  # lm_head
    for i in range(text.num_hidden_layers):
        total += attn + (expert * (1 + hit) + h * e if text.is_moe_layer(i) else 3 * h * text.intermediate_size_mlp)
    return int(total * bytes_per_param)


def active_params(text: TextConfig) -> int:
    """Parameters one token multiplies through (top-k routed + shared expert, attention, lm_head)."""
    return weights_touched(text, 1, 1)


# ---- sections ----------------------------------------------------------------------------------
@section("parity")
def parity(check: Check) -> dict:
    """Fast path vs reference path vs transformers on tiny checkpoints, fp32 and bf16."""
    from transformers import Llama4ForConditionalGeneration

    out = {}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 250, (n,), generator=g).tolist() for n in (7, 40, 93)]
    new = check.args.parity_tokens
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, logprobs=True)
    for name in ("tiny-scout", "tiny-maverick"):
        path = check.tmp / name
        synthesize(path, name, seed=5, dtype=torch.float32, progress=False)
        tokens, logprobs = {}, {}
        for label, options, dtype in (("reference fp32", {}, torch.float32), ("fast fp32", fast_options(),
                                      torch.float32), ("fast bf16", fast_options(), torch.bfloat16)):
            cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, kv_cache_bytes=64 * 2**20, **options)
            engine = Engine.from_pretrained(path, cfg, device=check.device, dtype=dtype)
            done = engine.generate(prompts, params)
            tokens[label] = [c.token_ids for c in done]
            logprobs[label] = torch.tensor([c.logprobs for c in done])
        ref = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(check.device).eval()
        hf = []
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p], device=check.device)
                o = ref.language_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                                min_new_tokens=new, do_sample=False, eos_token_id=None,
                                                pad_token_id=0)
                hf.append(o[0, len(p):].tolist())
        flat = lambda t: [x for row in t for x in row]  # noqa: E731
        agree = sum(a == b for a, b in zip(flat(tokens["fast bf16"]), flat(tokens["reference fp32"]), strict=True))
        res = {
            "fast_fp32_tokens_equal_reference": tokens["fast fp32"] == tokens["reference fp32"],
            "fast_fp32_tokens_equal_transformers": tokens["fast fp32"] == hf,
            "max_logprob_diff_fp32": float((logprobs["fast fp32"] - logprobs["reference fp32"]).abs().max()),
            "bf16_greedy_agreement": agree / len(flat(tokens["reference fp32"])),
        }
        out[name] = res
        ok = res["fast_fp32_tokens_equal_reference"] and res["fast_fp32_tokens_equal_transformers"]
        check.row(f"parity {name} fp32 (fast = ref = transformers)", "equal" if ok else "DIFFERENT",
                  f"largest logprob difference {res['max_logprob_diff_fp32']:.1e}")
        check.row(f"parity {name} bf16 greedy agreement with fp32", f"{100 * res['bf16_greedy_agreement']:.1f}%")
        del ref
    return out


def scout(check: Check) -> tuple[Llama4, Tokenizer]:
    """The Scout-shaped model of this run (built on the device once)."""
    if "scout" not in check.shared:
        tok_dir = check.tmp / "tok"
        write_synthetic_tokenizer(tok_dir, seed=0)
        tok = Tokenizer.from_dir(tok_dir)
        vocab = check.args.vocab_size or (512 if check.args.tiny else SCOUT_VOCAB)
        cfg = scout_config(check.args.num_layers, tok, vocab, check.args.tiny)
        start = time.perf_counter()
        model = build_model(cfg, check.device, check.args.dtype)
        sync(check.device)
        print(f"  built {'tiny-scout' if check.args.tiny else 'Scout'}-shaped model on {check.device} "
              f"({cfg.text.num_hidden_layers} layers, hidden {cfg.text.hidden_size}, vocab {cfg.text.vocab_size}) "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
        check.shared["scout"] = (model, tok)
    return check.shared["scout"]


def scout_engine(check: Check, max_batched_tokens: int) -> Engine:
    model, tok = scout(check)
    cfg = EngineConfig(max_num_seqs=max(check.args.batches), max_num_batched_tokens=max_batched_tokens,
                       kv_cache_bytes=check.args.kv_cache_mb * 2**20, enable_prefix_caching=False, **fast_options())
    return Engine(model, tok, cfg)


@section("decode")
def decode(check: Check) -> dict:
    model, _ = scout(check)
    text = model.cfg.text
    engine = scout_engine(check, max(check.args.batches) * check.args.prompt_len)
    nbytes = model.dtype.itemsize
    g = torch.Generator().manual_seed(1)
    out = {}
    for batch in check.args.batches:
        step_s = []
        for attempt in range(2):  # the first run compiles / captures
            prompts = [torch.randint(10, 250, (check.args.prompt_len,), generator=g).tolist() for _ in range(batch)]
            params = SamplingParams(max_tokens=check.args.new_tokens, temperature=0.0, ignore_eos=True)
            for p in prompts:
                engine.add_request(p, params)
            times = []
            while engine.has_unfinished():
                decode_only = not engine.scheduler.waiting and all(
                    s.num_uncomputed == 1 for s in engine.scheduler.running)
                sync(check.device)
                t0 = time.perf_counter()
                engine.step()
                sync(check.device)
                if decode_only:
                    times.append(time.perf_counter() - t0)
            if attempt == 1:
                step_s = times
        step = statistics.median(step_s)
        tps = batch / step
        touched = weights_touched(text, batch, nbytes)
        res = {"step_ms": 1e3 * step, "tokens_per_s": tps, "weight_bytes_per_step": touched,
               "achieved_gbs": touched / step / 1e9}
        note = f"{res['achieved_gbs']:.0f} GB/s of weights"
        if check.bandwidth_gbs:
            res["roofline_fraction"] = res["achieved_gbs"] / check.bandwidth_gbs
            target = 0.8 if batch == 1 else 0.6
            note += f", {100 * res['roofline_fraction']:.0f}% of HBM roofline (target {100 * target:.0f}%)"
        out[str(batch)] = res
        check.row(f"decode batch {batch}", f"{tps:.1f} tokens/s", note)
    return out


@section("prefill")
def prefill(check: Check) -> dict:
    model, _ = scout(check)
    n = check.args.prefill_len
    engine = scout_engine(check, n)
    g = torch.Generator().manual_seed(2)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for _ in range(3):  # the first compiles
        prompt = torch.randint(10, 250, (n,), generator=g).tolist()
        sync(check.device)
        t0 = time.perf_counter()
        engine.generate([prompt], params)
        sync(check.device)
        times.append(time.perf_counter() - t0)
    seconds = min(times[1:])
    text = model.cfg.text
    flops = 2 * active_params(text) * n  # GEMMs
    flops += 4 * n * n // 2 * text.num_attention_heads * text.head_dim * text.num_hidden_layers  # causal QK^T + PV
    tflops = flops / seconds / 1e12
    res = {"tokens": n, "seconds": seconds, "tokens_per_s": n / seconds, "tflops": tflops}
    note = f"{tflops:.1f} TFLOP/s"
    if check.peak_tflops:
        res["mfu"] = tflops / check.peak_tflops
        note += f", MFU {100 * res['mfu']:.0f}% (target 50%)"
    check.row(f"prefill {n} tokens", f"{n / seconds:.0f} tokens/s", note)
    return res


@section("transformers")
def transformers_generate(check: Check) -> dict:
    """transformers' generate on the same tensors (the Llama4ForCausalLM layout, storage shared)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    model, _ = scout(check)
    cfg_dir = check.tmp / "hf-config"
    model.cfg.save(cfg_dir, dtype=str(model.dtype).removeprefix("torch."))
    text_cfg = Llama4TextConfig.from_dict(json.loads((cfg_dir / "config.json").read_text())["text_config"])
    with torch.device("meta"):
        hf = Llama4ForCausalLM(text_cfg)
    state = {k.removeprefix("language_model."): v for k, v in model.state_dict().items()
             if k.startswith("language_model.")}
    hf.load_state_dict(state, assign=True, strict=True)
    rotary = hf.model.rotary_emb  # its inv_freq is a buffer, not in the state dict: make it on the device
    with torch.device(check.device):
        hf.model.rotary_emb = type(rotary)(config=text_cfg)
    hf = hf.eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 250, (1, check.args.prompt_len), generator=g).to(check.device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
    new = check.args.new_tokens
    def seconds(tokens: int) -> float:
        sync(check.device)
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        sync(check.device)
        return time.perf_counter() - t0

    with torch.no_grad():
        seconds(4)  # warm-up
        # decode only: a 1-token generate (prefill + first token) subtracted; medians of 3
        short = statistics.median(seconds(1) for _ in range(3))
        long = statistics.median(seconds(new + 1) for _ in range(3))
    tps = new / max(long - short, 1e-9)
    res = {"decode_tokens_per_s_batch1": tps}
    herd = check.results.get("decode", {}).get("1", {}).get("tokens_per_s")
    note = ""
    if herd:
        res["herd_over_transformers"] = herd / tps
        note = f"herd batch 1 = {res['herd_over_transformers']:.1f}x transformers (target 50x)"
    check.row("transformers generate, batch 1", f"{tps:.1f} tokens/s", note)
    return res


@section("quantized_experts")
def quantized_experts(check: Check) -> dict:
    """FP8 and int4 routed-expert GEMMs against bf16 on one Scout-shaped MoE layer (tiny with
    `--tiny`): tokens/s, fraction of the HBM roofline of the quantized bytes, speed-up over bf16,
    error against each format's own dequantized math (bench/quant_gpu_check.py)."""
    from bench import quant_gpu_check as quant

    shape = quant.TINY if check.args.tiny else quant.SCOUT
    tbps = check.bandwidth_gbs / 1000 if check.bandwidth_gbs else None
    rows = quant.run(check.device, shape, check.args.batches, 2 if check.device == "cpu" else 50, tbps)
    for r in rows:
        roof = f"{r['roofline']:.0%} of HBM roofline, " if r["roofline"] is not None else ""
        check.row(f"experts {r['format']} ({r['kernel']}), batch {r['batch']}", f"{r['tokens_per_s']:.0f} tokens/s",
                  f"{roof}{r['speedup_vs_bf16']:.2f}x bf16, rel err {r['rel_error']:.4f}")
    bad = [r for r in rows if r["rel_error"] > (0.05 if r["format"] != "bf16" else 0.01)]
    if bad:
        raise RuntimeError(f"quantized experts off their own dequantized math: {bad}")
    return {"rows": rows}


# ---- the run -----------------------------------------------------------------------------------
def peaks(device: str) -> tuple[str, float | None, float | None]:
    if not device.startswith("cuda"):
        return "cpu", None, None
    name = torch.cuda.get_device_name()
    for key, (bw, tf) in DEVICE_PEAKS.items():
        if key in name:
            return name, bw, tf
    return name, None, None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny-scout instead of Scout widths (the CPU dry run)")
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=8192)
    ap.add_argument("--parity-tokens", type=int, default=32)
    ap.add_argument("--kv-cache-mb", type=int, default=16384)
    ap.add_argument("--sections", nargs="+", help=f"default: all of {list(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    args = ap.parse_args(argv)
    args.dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    names = args.sections or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}: choose from {list(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA device visible: run with --device cpu for the dry run")
    device_name, bw, tf = peaks(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        check = Check(args, args.device, Path(tmp), bw, tf)
        print(f"gpu-check on {device_name} (torch {torch.__version__}, commit {git_commit()}), sections {names}",
              flush=True)
        for name in names:
            t0 = time.perf_counter()
            try:
                check.results[name] = SECTIONS[name](check)
            except Exception as e:  # one broken section must not hide the others' figures
                traceback.print_exc()
                check.results[name] = {"error": f"{type(e).__name__}: {e}"}
                check.row(f"{name}", "FAILED", f"{type(e).__name__}: {e}"[:200])
                failed.append(name)
            print(f"  [{name}: {time.perf_counter() - t0:.1f} s]", flush=True)
    summary = {"device": device_name, "date": datetime.date.today().isoformat(), "commit": git_commit(),
               "torch": torch.__version__, "fast_path": fast_options(), "seconds": time.perf_counter() - started,
               "load": os.getloadavg()[0], **check.results}
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = [f"### {summary['date']}, {device_name}, commit `{summary['commit']}`: `make gpu-check` "
          f"({summary['seconds']:.0f} s, fast path {summary['fast_path'] or 'not in this tree'})", "",
          "| what | figure | against peak / target |", "|---|---|---|"]
    md += [f"| {w} | {f} | {n} |" for w, f, n in check.rows]
    (args.out / "gpu_check_row.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
