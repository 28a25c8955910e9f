"""One replica's MoE exchange through the expert group vs colocated experts, per MoE layer, without
Ray: two expert shards as spawned processes serving the real `serve_shard_generation` loop over gloo,
this process as the replica (`CollectiveExperts`), the colocated experts (`ColocatedExperts`)
timed in the same loop, alternating. Run it from two checkouts to compare their exchange code in
one sitting (the code of the current directory is imported):

    python bench/exchange_bench.py --batch 1                  # small-scout, fp32, 2 shards
    (cd /work/main && python /path/to/bench/exchange_bench.py --batch 1)

`bench/dispatch_bench.py` measures the same through the production `ExpertPool` on Ray, and
engine decode; `bench/group_floor.py` the round trip alone.
"""

# ruff: noqa: E402 (torch is imported after the OpenMP environment is set: libgomp reads it when it loads)
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())

from deployments.process_env import use_sharded_env

use_sharded_env()  # this process is a router replica of a sharded deployment: before torch loads libgomp

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _shard(path: str, spec, rank: int, pin: int | None) -> None:
    torch.set_num_threads(1)
    if pin is not None:
        os.sched_setaffinity(0, {pin})
    from deployments.expert_group import ShardStats, serve_shard_generation
    from model.checkpoint import load_expert_shard

    experts = load_expert_shard(path, range(*spec.shards[rank]))
    torch.set_grad_enabled(False)
    serve_shard_generation(spec, rank, experts, ShardStats(), lambda: False)


def run(args, path: str) -> None:
    from deployments.collective_experts import CollectiveExperts
    from deployments.engine.experts import ColocatedExperts
    from deployments.expert_group import GroupSpec
    from deployments.expert_shard import split_experts
    from model.checkpoint import load

    pins = [int(c) for c in args.pin.split(",")] if args.pin else [None] * (1 + args.num_shards)
    if pins[0] is not None:
        os.sched_setaffinity(0, {pins[0]})
    model = load(path)
    text = model.cfg.text
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    spec = GroupSpec(generation=1, host="127.0.0.1", port=store.port,
                     shards=tuple((r.start, r.stop) for r in split_experts(text.num_local_experts, args.num_shards)),
                     replicas=("bench",), moe_layers=tuple(text.moe_layers), hidden_size=text.hidden_size,
                     top_k=text.num_experts_per_tok, capacity=max(2048, args.batch), dtype=torch.float32,
                     timeout_s=120, backend=args.backend)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_shard, args=(path, spec, r, pins[1 + r]), daemon=True) for r in range(args.num_shards)]
    for p in procs:
        p.start()
    collective, colocated = CollectiveExperts(lambda after: spec, "bench"), ColocatedExperts(model)
    g = torch.Generator().manual_seed(args.batch)
    inputs = []
    with torch.inference_mode():
        for layer in spec.moe_layers:
            x = torch.randn(args.batch, text.hidden_size, generator=g)
            ids, scores = model.language_model.model.layers[layer].feed_forward.router.route(x)
            inputs.append((layer, x, ids, scores))

    def run_collective():
        with collective.step():
            return [collective.run(layer, x, i, s) for layer, x, i, s in inputs]

    def run_colocated():
        return [colocated.run(layer, x, i, s) for layer, x, i, s in inputs]

    fns = {"colocated": run_colocated, "collective": run_collective}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        diff = max((a - b).abs().max().item() for a, b in zip(run_colocated(), run_collective(), strict=True))
        for it in range(args.warmup + args.iters):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if it >= args.warmup:
                    times[name].append((time.perf_counter() - t0) / len(inputs))
    collective.close()
    for p in procs:
        p.join(10)
    med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f"{os.getcwd()}: batch {args.batch}, {len(inputs)} MoE layers, {args.num_shards} shards, pin "
          f"{args.pin or '-'}, load average {os.getloadavg()[0]:.1f}: ms per MoE layer (median of {args.iters}) "
          f"colocated {med['colocated']:.3f}, collective {med['collective']:.3f}, overhead "
          f"{med['collective'] - med['colocated']:.3f} (max |diff| {diff:.1e})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an fp32 checkpoint directory (default: a synthetic small-scout)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--num-shards", type=int, default=2)
    ap.add_argument("--backend", choices=["socket", "gloo"], default="socket", help="the expert group's CPU backend")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of this (the replica) process (default 2)")
    ap.add_argument("--pin", default="", help="cores of the replica, then of each shard, e.g. 0,1,1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        return run(args, args.model)
    from model.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="herd-exchange-bench-") as tmp:
        synthesize(Path(tmp) / "small-scout", "small-scout", dtype=torch.float32, progress=False)
        run(args, str(Path(tmp) / "small-scout"))


if __name__ == "__main__":
    main()
