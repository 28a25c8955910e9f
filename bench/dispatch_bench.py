"""MoE dispatch benchmark: sharded vs colocated experts on the same synthetic checkpoint, in one run.

This process is one engine replica; N `ExpertShard` actors on a local Ray, placed by the production
`ExpertPool`, form the expert group with it (`experts.transport: collective`: TCP sockets on the CPU,
or gloo with `--cpu-group-backend gloo`; NCCL on GPUs).

(a) The routed experts of every MoE layer of one step, per MoE layer, at each batch size (tokens):
    `ColocatedExperts.run` (in-process, `experts.mode: colocated`; and the same running a few rows
    one by one as a CPU shard does, `Experts.forward_rows`: "colocated, per-row") vs one group step of
    `CollectiveExperts` (step begin + one exchange per MoE layer, divided by the MoE layers) vs
    `ShardedExperts` (`experts.transport: ray`: one Ray actor call per shard and layer). Real inputs:
    random hidden states routed by each layer's own router. The backends alternate so that
    background load hits them alike; median and p90 over `--iters` steps after `--warmup`.
(b) End-to-end decode tokens/s of the engine at each batch size: colocated, sharded (collective,
    one micro-batch) and sharded with two micro-batches (`experts.micro_batches: 2`: one half's
    attention runs while the other half's experts do; the pool is re-made for it), greedy,
    ignore_eos, `--new-tokens` per request; time from the first generated token to the last. Each
    sharded mode's runs alternate with colocated ones ("colocated (1)", "colocated (2)"), and its
    ratio is taken against those.

Targets on the 2-core CPU (issue 11): sharded overhead per MoE layer at batch 1 <= 0.25 ms;
sharded/colocated decode throughput >= 0.8 at batch 128.

    python bench/dispatch_bench.py                                   # CPU, small-scout, fp32
    python bench/dispatch_bench.py --device cuda --preset scout --num-layers 4 --vocab-size 202048 \\
        --num-shards 2                                               # GPU (NCCL), bf16, Scout-shaped

The dtype follows the device as a router service's does (fp32 on CPU, bf16 on CUDA); the shards are given
it, as a router service gives them its own. The local Ray is started with `address="local"` (never joins
another cluster) and shut down at the end.
"""

# ruff: noqa: E402 (torch is imported after the OpenMP environment is set: libgomp reads it when it loads)
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster.launcher import RAY_ENV
from deployments.process_env import use_sharded_env

use_sharded_env()  # this process is a router replica of a sharded deployment: before torch loads libgomp

import torch

from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.experts import ColocatedExperts
from deployments.expert_group import run_experts
from engine_bench import sync, time_engine_decode
from model.checkpoint import load
from model.device import default_dtype
from model.synth import synthesize
from model.tokenizer import Tokenizer
from stats import percentile


def experts_config(args, micro_batches: int):
    from deployments.config import ExpertsConfig

    gpus = args.gpus_per_shard
    if gpus is None:
        gpus = min(1.0, torch.cuda.device_count() / args.num_shards) if args.device.startswith("cuda") else 0.0
    # a long group timeout: the shards wait in the group while this process times the colocated engine
    return ExpertsConfig(mode="sharded", num_shards=args.num_shards, num_cpus_per_shard=args.cpus_per_shard,
                         num_gpus_per_shard=gpus, micro_batches=micro_batches, group_timeout_s=3600,
                         cpu_group_backend=args.cpu_group_backend)


def start_shards(path: Path, args, dtype: torch.dtype, micro_batches: int = 1):
    """The production path: the ExpertPool actor places N shards in a placement group; this process
    joins their expert group as replica "bench". Returns (shards, CollectiveExperts)."""
    import ray

    from deployments.collective_experts import CollectiveExperts
    from deployments.expert_shard import get_or_create_pool, join_expert_group, kill_pool, wait_for_shards

    if not ray.is_initialized():
        os.environ.update(RAY_ENV)  # the Ray settings `herd up` and the chart use
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, namespace="herd-dispatch-bench",
                 log_to_driver=False)
    kill_pool()
    cfg = experts_config(args, micro_batches)
    t0 = time.perf_counter()

    def pool():
        return get_or_create_pool(str(path), cfg, args.device, dtype)

    shards = wait_for_shards(pool(), timeout_s=600)
    backend = CollectiveExperts(lambda after: join_expert_group(pool, "bench", args.capacity, after, 600), "bench",
                                args.device)
    print(f"{args.num_shards} expert shards ready after {time.perf_counter() - t0:.1f} s "
          f"(experts {[r for _, r in shards]}, {args.cpus_per_shard} CPU + {cfg.num_gpus_per_shard:g} GPU each, "
          f"{micro_batches} micro-batch(es))", file=sys.stderr, flush=True)
    return shards, backend


class AllLayers:
    """The routed experts of every MoE layer of one step through one backend (inputs routed per layer)."""

    def __init__(self, backend, framed: bool):
        self.backend, self.framed = backend, framed

    def __call__(self, inputs) -> list[torch.Tensor]:
        with self.backend.step() if self.framed else contextlib.nullcontext():
            return [self.backend.run(layer, x, ids, scores) for layer, x, ids, scores in inputs]


class ColocatedRows(ColocatedExperts):
    """Colocated experts that run a few rows the way a CPU shard does (`Experts.forward_rows`, up to
    `FEW_ROWS` pairs, `run_experts`; the engine's colocated path keeps `forward`): the overhead measured against it
    is what the transport adds, the shortcut the shard takes counted on both sides."""

    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return run_experts(self._layers[layer].feed_forward.experts, x, expert_ids, scores)


def time_layers(backends: dict, model, moe_layers: list[int], batch: int, args, dtype) -> dict:
    """Interleaved timing of all MoE layers' routed experts through each backend, per MoE layer."""
    g = torch.Generator(device="cpu").manual_seed(batch)
    hidden = model.cfg.text.hidden_size
    inputs = []
    with torch.inference_mode():
        for layer in moe_layers:
            x = torch.randn(batch, hidden, generator=g).to(device=args.device, dtype=dtype)
            ids, scores = model.language_model.model.layers[layer].feed_forward.router.route(x)
            inputs.append((layer, x, ids, scores))
        ref = backends["colocated"](inputs)
        diff = {name: max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, fn(inputs), strict=True))
                for name, fn in backends.items()}
    times: dict[str, list[float]] = {name: [] for name in backends}
    for it in range(args.warmup + args.iters):
        for name, fn in backends.items():
            sync(args.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn(inputs)
            sync(args.device)
            if it >= args.warmup:
                times[name].append((time.perf_counter() - t0) / len(moe_layers))
    hit = sum(int((torch.bincount(ids.flatten().cpu()) > 0).sum()) for _, _, ids, _ in inputs) / len(inputs)
    return {"times": times, "max_abs_diff": diff, "experts_hit": hit}


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


def group_floor(hidden: int, rounds: int, backend: str) -> dict:
    """Median round trips of one decode row over the group's CPU `backend` (bench/group_floor.py): 1 peer;
    2 peers, one replying."""
    from types import SimpleNamespace

    from group_floor import run_mode

    opts = SimpleNamespace(rows=1, hidden=hidden, rounds=rounds, warmup=100, threads=1, pin=False, backend=backend)
    return {name: statistics.median(run_mode(opts, peers, replying, False)["rounds"])
            for name, peers, replying in (("1 peer", 1, [1]), ("2 peers, one replies", 2, [1]))}


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
    shard.add_argument("--cpu-group-backend", choices=["socket", "gloo"], default="socket",
                       help="the expert group's backend when the shards have no GPU (default socket)")
    shard.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray (default 8)")
    what = ap.add_argument_group("measurements")
    what.add_argument("--batches", type=int, nargs="+", default=[1, 128],
                      help="batch sizes: tokens per MoE call in (a), sequences decoding in (b) (default 1 128)")
    what.add_argument("--skip-ray", action="store_true", help="leave out the Ray-call transport in (a)")
    what.add_argument("--iters", type=int, default=100, help="timed steps per backend and batch in (a) (default 100)")
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
    import ray

    from deployments.expert_shard import ShardedExperts

    model = load(path, device=args.device, dtype=dtype)
    text = model.cfg.text
    moe_layers = [i for i in range(text.num_hidden_layers) if text.is_moe_layer(i)]
    args.capacity = max(2048, *args.batches)
    shards, collective = start_shards(path, args, dtype)
    colocated = ColocatedExperts(model)
    backends = {"colocated": AllLayers(colocated, False), "colocated, per-row": AllLayers(ColocatedRows(model), False),
                "collective": AllLayers(collective, True)}
    if not args.skip_ray:
        backends["ray"] = AllLayers(ShardedExperts(shards, timeout_s=600), False)

    floor = ray_floor(shards, max(50, args.iters // 2))
    args.group_floor = group_floor(text.hidden_size, max(500, 5 * args.iters), args.cpu_group_backend)
    layer_rows = []
    for batch in args.batches:
        print(f"(a) {len(moe_layers)} MoE layers, batch {batch}: {args.warmup} + {args.iters} steps per backend",
              file=sys.stderr, flush=True)
        layer_rows.append((batch, time_layers(backends, model, moe_layers, batch, args, dtype)))

    report(args, text, dtype, len(moe_layers), floor, layer_rows, [])
    sys.stdout.flush()
    decode_rows = []
    if not args.skip_decode:
        kv = int((args.kv_cache_gib or (0.5 if args.device == "cpu" else 4.0)) * 2**30)
        cfg = EngineConfig(max_num_seqs=max(64, *args.batches), max_num_batched_tokens=args.capacity,
                           kv_cache_bytes=kv)
        tok = Tokenizer.from_dir(path)
        tps: dict[tuple, list[float]] = {}
        g = torch.Generator().manual_seed(0)
        colocated_engine = Engine(model, tok, cfg, experts=colocated)
        # One phase per sharded mode (the overlap mode needs a pool made for it); in each, colocated and
        # sharded runs alternate, so that the machine's background load hits both alike.
        for phase, sharded in enumerate(["sharded", "sharded, 2 micro-batches"]):
            if phase:
                collective.close()
                shards, collective = start_shards(path, args, dtype, micro_batches=2)
            engines = {f"colocated ({phase + 1})": colocated_engine,
                       sharded: Engine(model, tok, cfg, experts=collective)}  # same weights; experts via the shards
            for batch in args.batches:
                for rep in range(args.repeats):
                    prompts = [torch.randint(10, 250, (args.prompt_len,), generator=g).tolist() for _ in range(batch)]
                    for mode, engine in engines.items():
                        print(f"(b) decode, {mode}, batch {batch}, run {rep + 1}/{args.repeats}", file=sys.stderr,
                              flush=True)
                        tps.setdefault((mode, batch), []).append(
                            time_engine_decode(engine, prompts, args.new_tokens, args.device))
            del engines
        modes = ["colocated (1)", "colocated (2)", "sharded", "sharded, 2 micro-batches"]
        for batch in args.batches:
            runs = {mode: tps[(mode, batch)] for mode in modes}
            decode_rows.append((batch, {m: statistics.median(v) for m, v in runs.items()}, runs))
    collective.close()
    if ray.is_initialized():
        from deployments.expert_shard import kill_pool

        kill_pool()
    report(args, text, dtype, len(moe_layers), floor, [], decode_rows)


def report(args, text, dtype, num_moe, floor, layer_rows, decode_rows) -> None:
    """(a) as soon as it is measured (decode_rows empty), (b) at the end (layer_rows empty)."""
    if not layer_rows:
        return report_decode(args, decode_rows)
    print(f"\n{args.model or args.preset} ({text.num_hidden_layers} layers, {num_moe} MoE, hidden "
          f"{text.hidden_size}, {text.num_local_experts} experts, top-{text.num_experts_per_tok}), {args.device}, "
          f"{dtype}; {args.num_shards} shards x {args.cpus_per_shard:g} CPU; torch threads here "
          f"{torch.get_num_threads()}; load average (1 min) {os.getloadavg()[0]:.1f} now")
    print(f"  Ray actor round trip (no-op call to a shard), median: {1e3 * floor:.3f} ms")
    print(f"  {args.cpu_group_backend} round trip of one row, no experts (bench/group_floor.py), median: "
          + "; ".join(f"{name} {1e3 * t:.3f} ms" for name, t in args.group_floor.items()))
    print(f"\n(a) routed experts of all {num_moe} MoE layers of a step, ms per MoE layer (median / p90 over "
          f"{args.iters} steps after {args.warmup} warm-up); overhead = sharded - colocated")
    names = list(layer_rows[0][1]["times"]) if layer_rows else []
    head = " ".join(f"{n + ' p50 / p90':>22s}" for n in names)
    print(f"  {'batch':>6s} {'experts hit':>11s} {head} {'collective overhead':>20s} {'vs per-row':>10s} "
          f"{'max |diff|':>10s}")
    for batch, r in layer_rows:
        t = r["times"]
        cells = " ".join(f"{1e3 * statistics.median(t[n]):10.3f} / {1e3 * percentile(t[n], 90):9.3f}" for n in names)
        overhead, rows_overhead = (statistics.median(t["collective"]) - statistics.median(t[n])
                                   for n in ("colocated", "colocated, per-row"))
        diff = max(r["max_abs_diff"].values())
        print(f"  {batch:6d} {r['experts_hit']:11.1f} {cells} {1e3 * overhead:17.3f} ms {1e3 * rows_overhead:7.3f} ms "
              f"{diff:10.2e}")
    if layer_rows:
        one = min(layer_rows, key=lambda row: row[0])
        t = one[1]["times"]
        overhead, rows_overhead = (1e3 * (statistics.median(t["collective"]) - statistics.median(t[n]))
                                   for n in ("colocated", "colocated, per-row"))
        print(f"  target: overhead per MoE layer at batch {one[0]} <= 0.25 ms: {overhead:.3f} ms "
              f"({'meets' if overhead <= 0.25 else 'misses'} it); {rows_overhead:.3f} ms against colocated experts "
              f"running few rows as the shards do ({'meets' if rows_overhead <= 0.25 else 'misses'} it)")
    report_decode(args, decode_rows)


def report_decode(args, decode_rows) -> None:
    if decode_rows:
        print(f"\n(b) engine decode, tokens/s ({args.prompt_len}-token prompts, {args.new_tokens} new tokens each, "
              f"greedy; median of {args.repeats}); colocated (n) alternates with the n-th sharded mode; "
              f"load average (1 min) {os.getloadavg()[0]:.1f} now")
        modes = list(decode_rows[0][1])
        print(f"  {'batch':>6s} " + " ".join(f"{m:>26s}" for m in modes) + "   sharded/colocated (1 mb | 2 mb)")
        for batch, r, runs in decode_rows:
            ratios = [r["sharded"] / r["colocated (1)"], r["sharded, 2 micro-batches"] / r["colocated (2)"]]
            print(f"  {batch:6d} " + " ".join(f"{r[m]:26.1f}" for m in modes) + f"   {ratios[0]:.2f} | "
                  f"{ratios[1]:.2f}    every run: " + " | ".join(" ".join(f"{v:.0f}" for v in runs[m]) for m in modes))
        big = max(decode_rows, key=lambda row: row[0])
        best = max(big[1]["sharded"] / big[1]["colocated (1)"],
                   big[1]["sharded, 2 micro-batches"] / big[1]["colocated (2)"])
        print(f"  target: sharded/colocated >= 0.8 at batch 128; here at batch {big[0]}: {best:.2f} "
              f"({'meets' if best >= 0.8 else 'misses'} it on {args.device})")


if __name__ == "__main__":
    main()
