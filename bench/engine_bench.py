"""Engine benchmark: the reference path vs the fast path (and, with `--compare vllm`, vLLM's CPU
build) on the same synthetic checkpoint and prompts, side by side in one run.

For each engine path and batch size (default 1, 16, 64; prompts of 128 random tokens, 32 greedy
tokens each, no EOS stop) it prints:
- output tokens/s including prefill: batch x new tokens / (add the requests .. all finished),
  after one untimed run of the same shape (warm-up, compilation);
- decode step time: median wall time of the decode-only steps of that run;
- aten ops per decode step (torch.profiler, one decode step; ops called from Python, and with the
  ops nested in them in the JSON), the attention calls and the host-sync ops/calls among them;
and for `--compare vllm` whether vLLM's greedy tokens equal Herd's reference path's.

    python bench/engine_bench.py                                # CPU, small-scout, reference vs fast
    python bench/engine_bench.py --compare vllm                 # + vLLM-CPU (bench/make_vllm_venv.sh)
    python bench/engine_bench.py --paths reference fast fast+compile --batches 1 64

Engine paths are named (`PATHS`): a path whose backend or kernel is not registered in this tree
runs what is (the table says so), so the script works before and after the fast path lands. Each
path runs in a process of its own, as vLLM does (`--same-process` to run them all in this one: an
engine built after others in one process measured up to ~30% slower on a 2-core VM).
`bench/gpu_check.py` (`make gpu-check`) runs the GPU figures (roofline, MFU, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.engine.attention import ATTENTION_BACKENDS
from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from deployments.engine.step_ops import profile_step  # the structure tests' op counter
from model.device import default_dtype
from model.expert_kernel import EXPERT_KERNELS
from model.synth import synthesize

PATHS: dict[str, dict] = {
    "reference": {"attention_backend": "reference", "expert_kernel": "reference"},
    "fast": {"attention_backend": "flex", "expert_kernel": "grouped"},
    "fast+compile": {"attention_backend": "flex", "expert_kernel": "grouped", "compile": True},
    "reference+compile": {"attention_backend": "reference", "expert_kernel": "reference", "compile": True},
}
REGISTRIES = {"attention_backend": ATTENTION_BACKENDS, "expert_kernel": EXPERT_KERNELS}
VLLM_PYTHON = os.environ.get("VLLM_PYTHON", "/work/vllm-venv/bin/python")


def engine_options(path: str) -> tuple[dict, list[str]]:
    """EngineConfig keywords of engine path `path` that this tree has, and what it lacks."""
    options, missing = {}, []
    for key, value in PATHS[path].items():
        if key not in EngineConfig.model_fields:
            missing.append(f"no EngineConfig.{key}")
        elif key in REGISTRIES and value not in REGISTRIES[key]:
            missing.append(f"{key} {value!r} not registered")
        else:
            options[key] = value
    return options, missing


@dataclass
class Run:
    path: str
    batch: int
    tokens_per_s: float
    step_ms: float
    token_ids: list[list[int]]
    ops: dict = field(default_factory=dict)


def make_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 250, (length,), generator=g).tolist() for _ in range(batch)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generate_timed(engine: Engine, prompts: list[list[int]], new_tokens: int, device: str
                   ) -> tuple[float, list[float], list[list[int]]]:
    """(seconds from adding the requests to the last token, decode-only step times, tokens per request)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    rids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {r: [] for r in rids}
    step_times = []
    while engine.has_unfinished():
        decode = not engine.scheduler.waiting and all(s.num_uncomputed == 1 for s in engine.scheduler.running)
        t0 = time.perf_counter()
        outs = engine.step()
        sync(device)
        if decode:
            step_times.append(time.perf_counter() - t0)
        for o in outs:
            tokens[o.request_id].extend(o.token_ids)
    return time.perf_counter() - start, step_times, [tokens[r] for r in rids]


def time_engine_decode(engine: Engine, prompts: list[list[int]], new_tokens: int, device: str) -> float:
    """Decode tokens/s: time from the first generated token to the last, over all requests (what
    bench/dispatch_bench.py compares between expert transports)."""
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


def count_ops(engine: Engine, prompts: list[list[int]]) -> dict:
    """Profile one decode step of `len(prompts)` sequences: aten ops called from Python, attention
    calls (SDPA + compiled regions, see step_ops.py) and host-sync ops/calls."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
        engine.step()  # prefill
    engine.step()  # a first decode step (e.g. compiles), not profiled
    ops = profile_step(engine)
    while engine.has_unfinished():
        engine.step()
    return {"aten_ops": sum(ops.top.values()), "aten_ops_nested": sum(ops.all.values()),
            "attention_calls": ops.attention_calls, "sync_ops": sum(ops.syncs.values())}


def run_engine(path: str, ckpt: Path, args, dtype: torch.dtype, prompts: dict[int, list[list[int]]]) -> list[Run]:
    options, _ = engine_options(path)
    cfg = EngineConfig(max_num_seqs=max(args.batches), max_num_batched_tokens=args.max_batched_tokens,
                       kv_cache_bytes=args.kv_cache_mb * 2**20, enable_prefix_caching=False, **options)
    engine = Engine.from_pretrained(ckpt, cfg, device=args.device, dtype=dtype)
    runs = []
    for batch in args.batches:
        warm = make_prompts(batch, args.prompt_len, seed=1000 + batch)
        generate_timed(engine, warm, args.new_tokens, args.device)  # warm-up (and compilation)
        seconds, steps, ids = generate_timed(engine, prompts[batch], args.new_tokens, args.device)
        run = Run(path, batch, batch * args.new_tokens / seconds, 1e3 * statistics.median(steps), ids)
        if not args.no_ops:
            run.ops = count_ops(engine, make_prompts(batch, args.prompt_len, seed=2000 + batch))
        runs.append(run)
        print(f"  {path:18s} batch {batch:3d}: {run.tokens_per_s:8.1f} tokens/s, decode step {run.step_ms:7.2f} ms"
              + (f", {run.ops['aten_ops']} aten ops/step" if run.ops else ""), flush=True)
    return runs


def run_engine_apart(path: str, ckpt: Path, args) -> list[Run]:
    """`run_engine` in a fresh process (this script with `--paths path --same-process`), as vLLM
    runs in its own: an engine built after others in one process measured up to ~30% slower here."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs.json"
        argv = [sys.executable, __file__, "--same-process", "--checkpoint", str(ckpt), "--paths", path,
                "--device", args.device, "--batches", *map(str, args.batches), "--prompt-len", str(args.prompt_len),
                "--new-tokens", str(args.new_tokens), "--max-batched-tokens", str(args.max_batched_tokens),
                "--kv-cache-mb", str(args.kv_cache_mb), "--json", str(out), *(["--no-ops"] if args.no_ops else [])]
        proc = subprocess.run(argv, capture_output=True, text=True)
        sys.stdout.write("".join(ln + "\n" for ln in proc.stdout.splitlines() if ln.startswith("  ")))
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-5000:])
            raise SystemExit(f"engine path {path} failed (exit {proc.returncode})")
        fields = ("aten_ops", "aten_ops_nested", "attention_calls", "sync_ops")
        return [Run(r["path"], r["batch"], r["tokens_per_s"], r["step_ms"], r["token_ids"],
                    {k: r[k] for k in fields if k in r}) for r in json.loads(out.read_text())["runs"]]


def run_vllm(ckpt: Path, args, dtype: torch.dtype, prompts: dict[int, list[list[int]]]) -> tuple[str, list[Run]]:
    """vLLM's CPU build in its own venv on the text-only layout of the same weights."""
    from bench.causal_lm_checkpoint import convert

    if not Path(VLLM_PYTHON).exists():
        raise SystemExit(f"--compare vllm needs {VLLM_PYTHON}: run bench/make_vllm_venv.sh (or set VLLM_PYTHON)")
    with tempfile.TemporaryDirectory() as tmp:
        text = convert(ckpt, Path(tmp) / "text")
        job = {"model": str(text), "dtype": str(dtype).removeprefix("torch."), "new_tokens": args.new_tokens,
               "max_num_seqs": max(args.batches), "max_model_len": args.prompt_len + args.new_tokens + 16,
               "batches": {str(b): prompts[b] for b in args.batches}}
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        proc = subprocess.run([VLLM_PYTHON, str(Path(__file__).with_name("vllm_generate.py"))],
                              input=json.dumps(job), capture_output=True, text=True, env=env, cwd=tmp)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"vLLM run failed (exit {proc.returncode})")
    result = json.loads(lines[-1].removeprefix("VLLM_RESULT "))
    runs = []
    for b in args.batches:
        r = result["batches"][str(b)]
        runs.append(Run("vllm", b, r["tokens_per_s"], float("nan"), r["token_ids"]))
        print(f"  {'vllm ' + result['version']:18s} batch {b:3d}: {r['tokens_per_s']:8.1f} tokens/s", flush=True)
    return result["version"], runs


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """'equal' or how many of the tokens agree before each sequence's first difference."""
    if a == b:
        return "equal"
    def prefix(p: list[int], q: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(p, q, strict=False)) if x != y), len(p))

    same = sum(prefix(p, q) for p, q in zip(a, b, strict=True))
    return f"{same}/{sum(map(len, a))} tokens before first divergence"


def report(runs: list[Run], args, notes: list[str]) -> str:
    paths = list(dict.fromkeys(r.path for r in runs))
    by = {(r.path, r.batch): r for r in runs}
    lines = ["| output tokens/s (incl. prefill) | " + " | ".join(f"batch {b}" for b in args.batches) + " |",
             "|---|" + "---|" * len(args.batches)]
    for p in paths:
        lines.append(f"| {p} | " + " | ".join(f"{by[p, b].tokens_per_s:.0f}" for b in args.batches) + " |")
    lines += ["", "| decode step ms / aten ops per step / attention calls / syncs | "
              + " | ".join(f"batch {b}" for b in args.batches) + " |", "|---|" + "---|" * len(args.batches)]
    for p in paths:
        if p == "vllm":
            continue
        cells = []
        for b in args.batches:
            r = by[p, b]
            ops = r.ops
            cells.append(f"{r.step_ms:.2f} / {ops.get('aten_ops', '-')} / {ops.get('attention_calls', '-')} / "
                         f"{ops.get('sync_ops', '-')}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    reference = [p for p in paths if p != "reference"]
    if "reference" in paths and reference:
        lines.append("")
        for p in reference:
            agree = [agreement(by["reference", b].token_ids, by[p, b].token_ids) for b in args.batches]
            lines.append(f"greedy tokens, {p} vs reference: " + ", ".join(
                f"batch {b} {a}" for b, a in zip(args.batches, agree, strict=True)))
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small-scout")
    ap.add_argument("--checkpoint", type=Path, help="an existing checkpoint instead of synthesizing --preset")
    ap.add_argument("--num-layers", type=int)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--paths", nargs="+", default=["reference", "fast"], choices=list(PATHS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-mb", type=int, default=1024)
    ap.add_argument("--no-ops", action="store_true", help="skip the profiled step (ops per step)")
    ap.add_argument("--compare", nargs="*", default=[], choices=["vllm"])
    ap.add_argument("--json", type=Path, help="write every figure here too")
    ap.add_argument("--same-process", action="store_true",
                    help="run every engine path in this process (default: each path in its own process)")
    args = ap.parse_args()
    dtype = default_dtype(args.device)
    notes = []
    for p in args.paths:
        _, missing = engine_options(p)
        if missing:
            notes.append(f"{p}: {'; '.join(missing)} in this tree: ran without it")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or Path(tmp) / args.preset
        if args.checkpoint is None:
            synthesize(ckpt, args.preset, num_layers=args.num_layers, vocab_size=args.vocab_size, dtype=dtype,
                       device=args.device, progress=False)
        prompts = {b: make_prompts(b, args.prompt_len, seed=b) for b in args.batches}
        print(f"{args.preset}, {args.device}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        if args.same_process or len(args.paths) == 1:
            runs = [r for p in args.paths for r in run_engine(p, ckpt, args, dtype, prompts)]
        else:
            runs = [r for p in args.paths for r in run_engine_apart(p, ckpt, args)]
        if "vllm" in args.compare:
            version, vruns = run_vllm(ckpt, args, dtype, prompts)
            runs += vruns
            ref = next((p for p in args.paths), None)
            if ref is not None:
                by = {(r.path, r.batch): r for r in runs}
                notes.append(f"vLLM {version} greedy tokens vs herd {ref}: " + ", ".join(
                    f"batch {b} {agreement(by[ref, b].token_ids, by['vllm', b].token_ids)}" for b in args.batches))
    table = report(runs, args, notes)
    print(f"\n{platform.node()}, load after: {os.getloadavg()[0]:.1f}\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "notes": notes, "runs": [
            {"path": r.path, "batch": r.batch, "tokens_per_s": r.tokens_per_s, "step_ms": r.step_ms, **r.ops,
             "token_ids": r.token_ids}
            for r in runs]}, indent=2))


if __name__ == "__main__":
    main()
