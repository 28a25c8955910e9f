"""Prefix-cache benchmark: TTFT of a follow-up question on a long document, cold vs local hit vs
Redis hit on another replica, and Redis load throughput, measured side by side in one run.

Two engines stand for two router-service replicas: A prefills the document (and writes its chunks to
Redis), B has an empty local cache. Each TTFT is the time from the request to its first token,
including the Redis lookup, fetch, checks and the load into the paged cache.

    python bench/prefix_cache_bench.py                          # CPU: small-scout, 4k-token document
    python bench/prefix_cache_bench.py --device cuda --preset scout --num-layers 4 --doc-tokens 32768

Load throughput compares, on the same stored chunk values, the router service's store
(deployments/shared_cache/store.py: redis-py's blocking client with hiredis, on worker threads) with
redis.asyncio on an event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.launcher import redis_cache_command
from deployments.config import RedisConfig
from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.kv_transfer import KVChunk
from deployments.engine.params import SamplingParams
from deployments.shared_cache.codec import decode, encode
from deployments.shared_cache.setup import connect_shared_cache
from model.checkpoint import load
from model.device import default_dtype
from model.synth import synthesize
from model.tokenizer import Tokenizer


def start_redis(port: int) -> subprocess.Popen:
    binary = shutil.which("redis-server") or sys.exit("redis-server is not installed: apt-get install redis-server")
    proc = subprocess.Popen(redis_cache_command(binary, port, "8gb"), stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def make_engine(path: Path, args, redis_url: str) -> tuple[Engine, object]:
    dtype = default_dtype(args.device)
    cfg = EngineConfig(max_num_batched_tokens=args.prefill_chunk, kv_cache_bytes=args.kv_cache_mb << 20,
                       max_model_len=args.doc_tokens + 256)
    engine = Engine(load(path, device=args.device, dtype=dtype), Tokenizer.from_dir(path), cfg)
    tier = connect_shared_cache(RedisConfig(url=redis_url, chunk_tokens=args.chunk_tokens, fetch_policy="always",
                                            max_inflight_mb=4096, secret_file=str(path.parent / "cache-secret")),
                                engine, str(path))
    return engine, tier


def ttft(engine: Engine, tier, ids: list[int], device: str) -> tuple[float, int]:
    """Seconds to the first token (lookup + fetch + load + remaining prefill), and Redis-hit tokens."""
    start = time.perf_counter()
    chunks, known = asyncio.run(tier.lookup(engine, ids)) if tier is not None else ([], 0)
    rid = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0), shared_chunks=chunks,
                             num_shared_chunks=known)
    remote = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                remote = out.num_cached_tokens_shared
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, remote


def load_throughput(tier, stored: list[bytes], port: int, total_mb: int, repeats: int) -> dict[str, float]:
    """GB/s of loading `total_mb` of stored chunks: the router service's path (`SharedCache.fetch`: pipelined
    reads, every value checked and viewed as tensors) next to bare MGETs by redis-py's clients.
    The chunks are re-encoded copies of the document's largest one under fresh digests (`stored`: the
    document's chunk digests)."""
    import redis
    import redis.asyncio as aredis

    sync_client = redis.Redis(port=port)
    keys = [tier.ns.key(d) for d in stored]
    index = max(range(len(keys)), key=lambda i: len(sync_client.get(keys[i])))
    sample = decode(tier.ns, sync_client.get(keys[index]), stored[index], index)
    size = len(encode(tier.ns, sample))
    digests = [i.to_bytes(16, "little") for i in range((total_mb << 20) // size)]
    sync_client.mset({tier.ns.key(d): bytes(encode(tier.ns, KVChunk(i, d, sample.kv))) for i, d in enumerate(digests)})
    names = [tier.ns.key(d) for d in digests]
    batches = [names[i : i + len(keys)] for i in range(0, len(names), len(keys))]
    total = len(digests) * size

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return total / min(times) / 1e9

    async def tier_fetch():
        for n in range(0, len(digests), len(keys)):
            assert len(await tier.fetch(digests[n : n + len(keys)], n)) == len(digests[n : n + len(keys)])

    async def redis_py_async():
        client = aredis.Redis(port=port)
        for batch in batches:
            await client.mget(batch)
        await client.aclose()

    return {"herd: fetch + check + view": best(lambda: asyncio.run(tier_fetch())),
            "redis.asyncio MGET only": best(lambda: asyncio.run(redis_py_async())),
            "redis-py blocking MGET only": best(lambda: [sync_client.mget(b) for b in batches]),
            "bytes": total, "value": size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-scout")
    p.add_argument("--num-layers", type=int, default=None, help="shorten the preset (Scout-shaped on one GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--doc-tokens", type=int, default=4096)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--prefill-chunk", type=int, default=2048, help="engine max_num_batched_tokens")
    p.add_argument("--kv-cache-mb", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=6479)
    p.add_argument("--load-mb", type=int, default=512, help="bytes read by the load-throughput test")
    args = p.parse_args()

    redis_proc = start_redis(args.port)
    url = f"redis://127.0.0.1:{args.port}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / args.preset
            (Path(tmp) / "cache-secret").write_text(secrets.token_hex(32))
            synthesize(path, args.preset, num_layers=args.num_layers, progress=True)
            run(path, args, url)
    finally:
        redis_proc.kill()


def run(path: Path, args, url: str) -> None:
    vocab = 200  # plain byte-level tokens: no special token lands in the document
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(10, vocab, (args.doc_tokens,), generator=g).tolist()
    question = lambda n: doc + [11, 12 + n, 13, 14]  # noqa: E731
    results: dict[str, list[float]] = {"cold": [], "local hit": [], "redis hit (other replica)": []}
    remote_tokens = 0
    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats}", flush=True)
        cold_engine, _ = make_engine(path, args, url)
        results["cold"].append(ttft(cold_engine, None, question(100 + r), args.device)[0])
        a, tier_a = make_engine(path, args, url)
        ttft(a, tier_a, question(0), args.device)  # replica A prefills the document and writes it
        tier_a.store.flush(timeout_s=120)
        results["local hit"].append(ttft(a, tier_a, question(1 + r), args.device)[0])
        b, tier_b = make_engine(path, args, url)
        seconds, remote_tokens = ttft(b, tier_b, question(50 + r), args.device)
        results["redis hit (other replica)"].append(seconds)
    stored, _ = b.prefix_chunks(question(0))
    gbps = load_throughput(tier_b, stored, args.port, args.load_mb, repeats=5)

    cold = statistics.median(results["cold"])
    print(f"\n{args.preset} ({args.num_layers or 'all'} layers), {args.device}, document {args.doc_tokens} tokens, "
          f"chunks of {args.chunk_tokens}; Redis hit loaded {remote_tokens} tokens")
    print(f"{'follow-up TTFT':<28}{'median s':>10}{'x cold':>9}")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:<28}{med:>10.4f}{med / cold:>9.3f}")
    print(f"\nRedis load throughput over {gbps.pop('bytes') / 2**20:.0f} MiB of stored chunk values of "
          f"{gbps.pop('value') / 2**20:.2f} MiB, {len(stored)} chunks per lookup (best of 5):")
    for name, value in gbps.items():
        print(f"{name:<28}{value:>8.2f} GB/s")


if __name__ == "__main__":
    main()
