"""MoE dispatch benchmark: sharded vs colocated experts on the same synthetic checkpoint, in one run.

(a) One MoE layer's routed-expert computation at each batch size (tokens): `ColocatedExperts.run`
    (in-process, what a router service runs with `experts.mode: colocated`) vs `ShardedExperts.run` (tokens
    sent to N `ExpertShard` actors on a local Ray and added back, `experts.mode: sharded`). The
    inputs are real: random hidden states routed by the layer's own router. Calls alternate between
    the two backends so that background load hits both alike; median and p90 over `--iters` calls
    after `--warmup`. Also the floor of one Ray actor round trip (a no-op call to a shard).
(b) End-to-end decode tokens/s of the engine at each batch size with either backend (greedy,
    ignore_eos, `--new-tokens` per request; time from the first generated token to the last).

The issue's target on a GPU: sharded throughput >= 80% of colocated at batch 128.

    python bench/dispatch_bench.py                                   # CPU, small-scout, fp32
    python bench/dispatch_bench.py --device cuda --preset scout --num-layers 4 --vocab-size 202048 \\
        --num-shards 2                                               # GPU, bf16, Scout-shaped

The dtype follows the device as a router service's does (fp32 on CPU, bf16 on CUDA); the shards are given
it, as a router service gives them its own. The local Ray is started with `address="local"` (never joins
another cluster) and shut down at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster.launcher import RAY_ENV
from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.experts import ColocatedExperts
from engine_bench import sync, time_engine_decode
from model.checkpoint import load
from model.device import default_dtype
from model.synth import synthesize
from model.tokenizer import Tokenizer
from stats import percentile


def start_shards(path: Path, args, dtype: torch.dtype) -> list[tuple]:
    """The production path: the ExpertPool actor places N shards in a placement group."""
    import ray

    from deployments.config import ExpertsConfig
    from deployments.expert_shard import get_or_create_pool, wait_for_shards

    gpus = args.gpus_per_shard
    if gpus is None:
        gpus = min(1.0, torch.cuda.device_count() / args.num_shards) if args.device.startswith("cuda") else 0.0
    os.environ.update(RAY_ENV)  # the Ray settings `herd up` and the chart use
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, namespace="herd-dispatch-bench",
             log_to_driver=False)
    cfg = ExpertsConfig(mode="sharded", num_shards=args.num_shards, num_cpus_per_shard=args.cpus_per_shard,
                        num_gpus_per_shard=gpus)
    t0 = time.perf_counter()
    shards = wait_for_shards(get_or_create_pool(str(path), cfg, args.device, dtype), timeout_s=600)
    print(f"{args.num_shards} expert shards ready after {time.perf_counter() - t0:.1f} s "
          f"(experts {[r for _, r in shards]}, {args.cpus_per_shard} CPU + {gpus:g} GPU each)",
          file=sys.stderr, flush=True)
    return shards


def time_layer(colocated, sharded, layer_idx: int, router, batch: int, hidden: int, args, dtype) -> dict:
    """Interleaved timing of one MoE layer's routed experts through both backends."""
    g = torch.Generator(device="cpu").manual_seed(batch)
    x = torch.randn(batch, hidden, generator=g).to(device=args.device, dtype=dtype)
    with torch.inference_mode():
        expert_ids, scores = router.route(x)
        ref = colocated.run(layer_idx, x, expert_ids, scores)
        got = sharded.run(layer_idx, x, expert_ids, scores)
    diff = (ref.float() - got.float()).abs().max().item()
    times: dict[str, list[float]] = {"colocated": [], "sharded": []}
    for it in range(args.warmup + args.iters):
        for name, backend in (("colocated", colocated), ("sharded", sharded)):
            sync(args.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                backend.run(layer_idx, x, expert_ids, scores)
            sync(args.device)
            if it >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    counts = torch.bincount(expert_ids.flatten().cpu(), minlength=router.out_features)
    return {"times": times, "max_abs_diff": diff, "experts_hit": int((counts > 0).sum()),
            "ref_scale": ref.float().abs().max().item()}


def ray_floor(shards: list[tuple], iters: int) -> float:
    import ray

    handle = shards[0][0]
    ray.get(handle.info.remote())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        ray.get(handle.info.remote())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = ap.add_argument_group("model")
    model.add_argument("--preset", default="small-scout", help="synthetic checkpoint preset (default small-scout)")
    model.add_argument("--model", help="an existing checkpoint directory instead of a synthetic one")
    model.add_argument("--num-layers", type=int, help="shorten the synthetic decoder to N layers")
    model.add_argument("--vocab-size", type=int, help="pad the synthetic vocabulary (e.g. 202048 as in Scout)")
    model.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16) (default cpu)")
    shard = ap.add_argument_group("shards")
    shard.add_argument("--num-shards", type=int, default=2, help="ExpertShard actors (default 2)")
    shard.add_argument("--cpus-per-shard", type=float, default=1.0,
                       help="Ray CPUs per shard (Ray sets the shard's torch threads from it; default 1)")
    shard.add_argument("--gpus-per-shard", type=float,
                       help="GPUs per shard (default: on cuda, the GPUs split over the shards; else 0)")
    shard.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray (default 8)")
    what = ap.add_argument_group("measurements")
    what.add_argument("--batches", type=int, nargs="+", default=[1, 128],
                      help="batch sizes: tokens per MoE call in (a), sequences decoding in (b) (default 1 128)")
    what.add_argument("--layer", type=int, help="the MoE layer timed in (a) (default: the first MoE layer)")
    what.add_argument("--iters", type=int, default=200, help="timed calls per backend and batch in (a) (default 200)")
    what.add_argument("--warmup", type=int, default=20, help="untimed calls first (default 20)")
    what.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence in (b) (default 64)")
    what.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence in (b) (default 32)")
    what.add_argument("--repeats", type=int, default=1, help="runs of (b) per mode and batch; the median is kept")
    what.add_argument("--skip-decode", action="store_true", help="only (a)")
    what.add_argument("--threads", type=int, help="torch threads of this (the colocated) process (default torch's)")
    what.add_argument("--kv-cache-gib", type=float, help="KV cache per engine (default 0.5 on cpu, 4 on cuda)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = default_dtype(args.device)  # as a router service
    with tempfile.TemporaryDirectory(prefix="herd-dispatch-bench-") as tmp:
        if args.model:
            path = Path(args.model).resolve()
        else:
            path = Path(tmp) / args.preset
            synthesize(path, args.preset, num_layers=args.num_layers, vocab_size=args.vocab_size, dtype=dtype,
                       device=args.device, progress=True)
        try:
            run(args, path, dtype)
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()


def run(args, path: Path, dtype: torch.dtype) -> None:
    from deployments.expert_shard import ShardedExperts

    model = load(path, device=args.device, dtype=dtype)
    text = model.cfg.text
    moe_layers = [i for i in range(text.num_hidden_layers) if text.is_moe_layer(i)]
    layer_idx = moe_layers[0] if args.layer is None else args.layer
    if layer_idx not in moe_layers:
        raise SystemExit(f"layer {layer_idx} is not a MoE layer; MoE layers: {moe_layers}")
    shards = start_shards(path, args, dtype)
    colocated, sharded = ColocatedExperts(model), ShardedExperts(shards, timeout_s=600)
    router = model.language_model.model.layers[layer_idx].feed_forward.router

    floor = ray_floor(shards, max(50, args.iters // 2))
    layer_rows = []
    for batch in args.batches:
        print(f"(a) MoE layer {layer_idx}, batch {batch}: {args.warmup} + {args.iters} calls per backend",
              file=sys.stderr, flush=True)
        layer_rows.append((batch, time_layer(colocated, sharded, layer_idx, router, batch, text.hidden_size,
                                             args, dtype)))

    decode_rows = []
    if not args.skip_decode:
        kv = int((args.kv_cache_gib or (0.5 if args.device == "cpu" else 4.0)) * 2**30)
        cfg = EngineConfig(max_num_seqs=max(64, *args.batches), max_num_batched_tokens=2048, kv_cache_bytes=kv)
        tok = Tokenizer.from_dir(path)
        engines = {"colocated": Engine(model, tok, cfg, experts=colocated),
                   "sharded": Engine(model, tok, cfg, experts=sharded)}  # same weights; experts via the shards
        g = torch.Generator().manual_seed(0)
        for batch in args.batches:
            tps: dict[str, list[float]] = {"colocated": [], "sharded": []}
            for rep in range(args.repeats):
                for name, engine in engines.items():
                    prompts = [torch.randint(10, 250, (args.prompt_len,), generator=g).tolist() for _ in range(batch)]
                    print(f"(b) decode, {name}, batch {batch}, run {rep + 1}/{args.repeats}", file=sys.stderr,
                          flush=True)
                    tps[name].append(time_engine_decode(engine, prompts, args.new_tokens, args.device))
            decode_rows.append((batch, {k: statistics.median(v) for k, v in tps.items()}, tps))

    report(args, text, dtype, layer_idx, len(moe_layers), floor, layer_rows, decode_rows)


def report(args, text, dtype, layer_idx, num_moe, floor, layer_rows, decode_rows) -> None:
    print(f"\n{args.model or args.preset} ({text.num_hidden_layers} layers, {num_moe} MoE, hidden "
          f"{text.hidden_size}, {text.num_local_experts} experts, top-{text.num_experts_per_tok}), {args.device}, "
          f"{dtype}; {args.num_shards} shards x {args.cpus_per_shard:g} CPU; torch threads here "
          f"{torch.get_num_threads()}")
    print(f"  Ray actor round trip (no-op call to a shard), median: {1e3 * floor:.3f} ms")
    print(f"\n(a) one MoE layer's routed experts (layer {layer_idx}), ms per call, {args.iters} calls after "
          f"{args.warmup} warm-up")
    print(f"  {'batch':>6s} {'experts hit':>12s} {'colocated p50':>14s} {'p90':>8s} {'sharded p50':>12s} {'p90':>8s}"
          f" {'sharded/colocated time':>23s} {'max |diff|':>11s}")
    for batch, r in layer_rows:
        c, s = r["times"]["colocated"], r["times"]["sharded"]
        cm, sm = statistics.median(c), statistics.median(s)
        print(f"  {batch:6d} {r['experts_hit']:12d} {1e3 * cm:14.3f} {1e3 * percentile(c, 90):8.3f} "
              f"{1e3 * sm:12.3f} {1e3 * percentile(s, 90):8.3f} {sm / cm:22.1f}x {r['max_abs_diff']:11.2e}")
    if decode_rows:
        print(f"\n(b) engine decode, tokens/s ({args.prompt_len}-token prompts, {args.new_tokens} new tokens each, "
              f"greedy; median of {args.repeats})")
        print(f"  {'batch':>6s} {'colocated':>11s} {'sharded':>11s} {'sharded/colocated':>18s}   every run "
              "(colocated | sharded)")
        for batch, r, runs in decode_rows:
            every = " | ".join(" ".join(f"{v:.0f}" for v in runs[name]) for name in ("colocated", "sharded"))
            ratio = r["sharded"] / r["colocated"]
            print(f"  {batch:6d} {r['colocated']:11.1f} {r['sharded']:11.1f} {100 * ratio:17.0f}%   {every}")
        big = max(decode_rows, key=lambda row: row[0])
        ratio = big[1]["sharded"] / big[1]["colocated"]
        print(f"  target (GPU): sharded >= 80% of colocated at batch 128; here at batch {big[0]}: {100 * ratio:.0f}% "
              f"({'meets' if ratio >= 0.8 else 'misses'} it on {args.device})")


if __name__ == "__main__":
    main()
