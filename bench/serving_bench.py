"""Serving benchmark: concurrent streaming clients against a Herd cluster, over gRPC
(`herd.v1.Herd/Generate`, server-streaming) and/or HTTP (OpenAI `/v1/completions`, `stream=true`).
Every request sends `--prompt-tokens` random token ids (`prompt_token_ids`, no text, no stop
strings) with greedy sampling and `ignore_eos`, so it generates exactly `--max-tokens` tokens.
Prints requests/s, output tokens/s, TTFT, ITL (gap between streamed chunks, as vLLM's
benchmark), TPOT and end-to-end latency percentiles, and errors.

    # against a running cluster (e.g. `herd up`): gRPC on 127.0.0.1:9000, HTTP on :8000
    python bench/serving_bench.py --target grpc --concurrency 8 --num-requests 64

    # start a local Ray + Serve app on a synthetic checkpoint, colocated vs 2 expert shards
    python bench/serving_bench.py --start --preset small-scout --experts colocated sharded --num-shards 2 \\
        --target grpc http --num-requests 32 --concurrency 8 --prompt-tokens 128 --max-tokens 32

With `--start` every (experts mode, target) pair is measured in the same run on the same
checkpoint and printed side by side. Each measurement (and its warm-up) draws prompts from its own
seed, so no prompt is served from the prefix cache (the "prompt tokens cached" row shows it). The
local Ray is started with `address="local"` (never joins another cluster) and shut down at the end;
with `--device cuda` the deployments share one GPU through fractional requests.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats import percentile

GRPC_SERVICERS = [
    "deployments.pb.herd_pb2_grpc.add_HerdServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


# ---- one request's measurements --------------------------------------------------------------

@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float | None = None  # send -> first chunk carrying a token
    latency: float | None = None  # send -> end of stream
    itls: list[float] = field(default_factory=list)  # gaps between token-carrying chunks
    output_tokens: int = 0
    chunks: int = 0
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache (usage)


def _short_error(e: BaseException) -> str:
    if callable(getattr(e, "code", None)) and callable(getattr(e, "details", None)):  # a grpc error
        text = f"grpc {e.code().name}: {e.details()}"
    else:
        text = f"{type(e).__name__}: {e}"
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


class GrpcTarget:
    name = "grpc"

    def __init__(self, address: str, timeout_s: float, api_key: str | None = None):
        import grpc

        from deployments.pb import herd_pb2 as pb
        from deployments.pb import herd_pb2_grpc

        self.pb, self.grpc = pb, grpc
        self.address, self.timeout_s = address, timeout_s
        self.where = address
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = herd_pb2_grpc.HerdStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else None

    async def check(self) -> str:
        models = await self.stub.ListModels(self.pb.ListModelsRequest(), timeout=30, metadata=self.metadata)
        return models.models[0].id if models.models else ""

    async def request(self, prompt: list[int], max_tokens: int) -> RequestResult:
        pb = self.pb
        req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        res, start = RequestResult(), time.perf_counter()
        last, finish = start, ""
        try:
            async for chunk in self.stub.Generate(req, timeout=self.timeout_s, metadata=self.metadata):
                now = time.perf_counter()
                if chunk.token_ids:
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
                    res.output_tokens += len(chunk.token_ids)
                    res.chunks += 1
                finish = chunk.finish_reason or finish
                if chunk.HasField("usage"):
                    res.cached_tokens = chunk.usage.cached_tokens
        except self.grpc.aio.AioRpcError as e:
            res.error = f"grpc {e.code().name}: {e.details()}"
            return res
        except Exception as e:  # counted as an error, the run goes on
            res.error = _short_error(e)
            return res
        res.latency = time.perf_counter() - start
        return _finish(res, finish, max_tokens)

    async def close(self) -> None:
        await self.channel.close()


class HttpTarget:
    name = "http"

    def __init__(self, base_url: str, timeout_s: float, concurrency: int, api_key: str | None = None):
        import httpx

        self.httpx = httpx
        self.base_url = self.where = base_url.rstrip("/")
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self.client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, limits=limits, headers=headers)
        self.model = ""

    async def check(self) -> str:
        r = await self.client.get("/v1/models", timeout=30)
        r.raise_for_status()
        data = r.json()["data"]
        self.model = data[0]["id"] if data else ""
        return self.model

    async def request(self, prompt: list[int], max_tokens: int) -> RequestResult:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        res, start = RequestResult(), time.perf_counter()
        last, finish, usage_tokens = start, "", None
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    res.error = f"http {r.status_code}: {(await r.aread()).decode(errors='replace')[:120]}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if "error" in chunk:
                        res.error = f"http stream error: {chunk['error'].get('message', chunk['error'])}"[:160]
                        return res
                    if chunk.get("usage"):
                        usage_tokens = chunk["usage"]["completion_tokens"]
                        details = chunk["usage"].get("prompt_tokens_details") or {}
                        res.cached_tokens = details.get("cached_tokens") or 0
                    if chunk.get("choices"):  # one chunk per engine delta (its text may be held back)
                        if res.ttft is None:
                            res.ttft = now - start
                        else:
                            res.itls.append(now - last)
                        last = now
                        res.chunks += 1
                        finish = chunk["choices"][0].get("finish_reason") or finish
        except Exception as e:
            res.error = _short_error(e)
            return res
        res.latency = time.perf_counter() - start
        res.output_tokens = usage_tokens if usage_tokens is not None else res.chunks
        return _finish(res, finish, max_tokens)

    async def close(self) -> None:
        await self.client.aclose()


def _finish(res: RequestResult, finish: str, max_tokens: int) -> RequestResult:
    if res.output_tokens != max_tokens or finish != "length":
        res.error = f"expected {max_tokens} tokens ending in 'length', got {res.output_tokens} ending in {finish!r}"
    else:
        res.ok = True
    return res


# ---- the load generator ----------------------------------------------------------------------

def make_prompts(n: int, length: int, seed: int, low: int, high: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(length)] for _ in range(n)]


async def drive(target, prompts: list[list[int]], max_tokens: int, concurrency: int, label: str,
                quiet: bool = False) -> tuple[list[RequestResult], float]:
    """Send every prompt with at most `concurrency` streams open; (results, wall seconds)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    results: list[RequestResult | None] = [None] * len(prompts)
    done = errors = 0
    every = max(1, len(prompts) // 10)
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal done, errors
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            res = await target.request(prompts[i], max_tokens)
            results[i] = res
            done += 1
            errors += not res.ok
            if not quiet and (done % every == 0 or done == len(prompts)):
                elapsed = time.perf_counter() - start
                print(f"  [{label}] {done:4d}/{len(prompts)} done, {done / elapsed:6.2f} req/s, "
                      f"{errors} errors, {elapsed:6.1f} s", file=sys.stderr, flush=True)
                if not res.ok:
                    print(f"  [{label}] last error: {res.error}", file=sys.stderr, flush=True)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    return results, time.perf_counter() - start  # type: ignore[return-value]


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [g for r in ok for g in r.itls]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    lat = [r.latency for r in ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    chunks = sum(r.chunks for r in ok)
    return {
        "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok), "error_kinds": errors,
        "wall_s": wall, "req_s": len(ok) / wall, "out_tok_s": out_tokens / wall,
        "ttft": [percentile(ttft, q) for q in (50, 90, 99)],
        "itl": [percentile(itl, q) for q in (50, 90, 99)],
        "tpot_p50": percentile(tpot, 50), "latency": [percentile(lat, q) for q in (50, 99)],
        "tokens_per_chunk": out_tokens / chunks if chunks else None, "cached_tokens": cached,
    }


_MEASUREMENTS = itertools.count()


async def measure(target, args, mode_label: str) -> dict:
    """Warm up, then the measured requests. Every measurement (and its warm-up) gets prompts of its
    own seed: a prompt seen before would be served from the router service's prefix cache."""
    try:
        model = await target.check()
    except Exception as e:  # one readable line instead of a traceback
        raise SystemExit(f"serving_bench: no Herd {target.name} endpoint at {target.where}: {_short_error(e)} "
                         "(start one with `herd up`, or pass --start)") from None
    label = f"{mode_label}/{target.name}"
    seed = args.seed + 1000 * next(_MEASUREMENTS)
    print(f"[{label}] serving {model!r}; warm-up: {args.warmup} requests", file=sys.stderr, flush=True)
    if args.warmup:
        warm = make_prompts(args.warmup, args.prompt_tokens, seed + 1, args.token_low, args.token_high)
        await drive(target, warm, args.max_tokens, args.concurrency, label, quiet=True)
    prompts = make_prompts(args.num_requests, args.prompt_tokens, seed, args.token_low, args.token_high)
    print(f"[{label}] {args.num_requests} requests, concurrency {args.concurrency}, "
          f"{args.prompt_tokens} prompt + {args.max_tokens} output tokens", file=sys.stderr, flush=True)
    results, wall = await drive(target, prompts, args.max_tokens, args.concurrency, label)
    return summarize(results, wall)


async def run_targets(args, grpc_address: str, http_url: str, mode_label: str) -> dict[str, dict]:
    from cluster.keys import client_api_key

    out, key = {}, client_api_key(args.api_key)
    for name in args.target:
        target = (GrpcTarget(grpc_address, args.timeout, key) if name == "grpc"
                  else HttpTarget(http_url, args.timeout, args.concurrency, key))
        try:
            out[f"{mode_label} {name}"] = await measure(target, args, mode_label)
        finally:
            await target.close()
    return out


# ---- a local cluster (--start) ---------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(model_dir: Path, mode: str, args) -> None:
    from ray import serve

    from cluster.app import build_app
    from deployments.config import HerdConfig
    from deployments.expert_shard import kill_pool

    kill_pool()
    sharded = mode == "sharded"
    gpu = args.device != "cpu"  # one GPU shared through fractional requests, as values-single-gpu.yaml
    vision_gpus = 0.1 if gpu else 0.0
    router_gpus = args.router_gpus if args.router_gpus is not None else (0.5 if sharded else 0.9) * gpu
    shard_gpus = args.gpus_per_shard if args.gpus_per_shard is not None else 0.4 / args.num_shards * gpu
    experts = {"mode": mode, "num_shards": args.num_shards if sharded else 1, "num_gpus_per_shard": shard_gpus}
    engine = {"max_num_seqs": max(64, args.concurrency)}
    cfg = HerdConfig.model_validate({
        "model": str(model_dir), "device": args.device, "experts": experts, "engine": engine,
        "router_service": {"num_replicas": args.router_replicas, "num_gpus": router_gpus / args.router_replicas},
        "vision": {"num_gpus": vision_gpus},
        "auth": {"enabled": False, "shared_anonymous_cache": True}})  # its own app, its own clients
    t0 = time.perf_counter()
    serve.run(build_app(cfg), name="herd", route_prefix="/")
    print(f"[{mode}] application running after {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def run_started(args) -> tuple[dict[str, dict], str]:
    import ray
    import torch
    from ray import serve
    from ray.serve.config import gRPCOptions

    from model.config import Llama4Config
    from model.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="herd-serving-bench-") as tmp:
        if args.model:
            model_dir = Path(args.model).resolve()
        else:
            model_dir = Path(tmp) / args.preset
            print(f"writing a synthetic {args.preset} checkpoint to {model_dir}", file=sys.stderr, flush=True)
            dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
            synthesize(model_dir, args.preset, num_layers=args.num_layers, dtype=dtype, progress=False)
        text = Llama4Config.from_dir(model_dir).text
        about = (f"{args.preset if not args.model else model_dir.name} ({text.num_hidden_layers} layers, "
                 f"hidden {text.hidden_size}, {text.num_local_experts} experts)")
        from cluster.launcher import RAY_ENV
        from deployments.expert_shard import kill_pool

        os.environ.update(RAY_ENV)  # the Ray settings `herd up` and the chart use
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, namespace="herd-serving-bench",
                 log_to_driver=False)
        try:
            http_port, grpc_port = free_port(), free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
            results = {}
            for mode in args.experts:
                deploy(model_dir, mode, args)
                label = mode if mode == "colocated" else f"sharded x{args.num_shards}"
                results |= asyncio.run(run_targets(args, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}",
                                                   label))
                serve.delete("herd")
                kill_pool()
        finally:
            serve.shutdown()
            ray.shutdown()
    return results, about


# ---- report ----------------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


def print_table(results: dict[str, dict], header: str) -> None:
    cols = list(results)
    width = max(18, *(len(c) + 2 for c in cols))
    rows = [
        ("requests ok / sent", lambda r: f"{r['ok']}/{r['requests']}"),
        ("errors", lambda r: str(r["errors"])),
        ("wall s", lambda r: f"{r['wall_s']:.1f}"),
        ("requests/s", lambda r: f"{r['req_s']:.2f}"),
        ("output tokens/s", lambda r: f"{r['out_tok_s']:.1f}"),
        ("TTFT p50 ms", lambda r: _ms(r["ttft"][0])),
        ("TTFT p90 ms", lambda r: _ms(r["ttft"][1])),
        ("TTFT p99 ms", lambda r: _ms(r["ttft"][2])),
        ("ITL p50 ms", lambda r: _ms(r["itl"][0])),
        ("ITL p90 ms", lambda r: _ms(r["itl"][1])),
        ("ITL p99 ms", lambda r: _ms(r["itl"][2])),
        ("TPOT p50 ms", lambda r: _ms(r["tpot_p50"])),
        ("latency p50 ms", lambda r: _ms(r["latency"][0])),
        ("latency p99 ms", lambda r: _ms(r["latency"][1])),
        ("tokens per chunk", lambda r: "-" if r["tokens_per_chunk"] is None else f"{r['tokens_per_chunk']:.2f}"),
        ("prompt tokens cached", lambda r: str(r["cached_tokens"])),
    ]
    print("\n" + header)
    print(f"  {'':20s}" + "".join(f"{c:>{width}s}" for c in cols))
    for name, fmt in rows:
        print(f"  {name:20s}" + "".join(f"{fmt(results[c]):>{width}s}" for c in cols))
    for c in cols:
        for err, n in results[c]["error_kinds"].items():
            print(f"  {c}: {n} x {err}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_argument_group("which cluster")
    where.add_argument("--start", action="store_true",
                       help="start a local Ray + Serve app on a synthetic checkpoint (or --model) and shut it down "
                            "at the end; without it, benchmark the running cluster at --address")
    where.add_argument("--address", default="127.0.0.1",
                       help="host of a running cluster, e.g. one started by `herd up` (default 127.0.0.1)")
    where.add_argument("--grpc-port", type=int, default=9000, help="its gRPC port (default 9000, as `herd up`)")
    where.add_argument("--http-port", type=int, default=8000, help="its HTTP port (default 8000, as `herd up`)")
    where.add_argument("--api-key", help="its API key (default: $HERD_API_KEY, else the admin key of `herd up` here)")
    start = ap.add_argument_group("with --start")
    src = start.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory to serve")
    src.add_argument("--preset", default="small-scout",
                     help="synthetic checkpoint preset, written to a temp dir (default small-scout)")
    start.add_argument("--num-layers", type=int, help="shorten the synthetic decoder to N layers")
    start.add_argument("--experts", nargs="+", choices=("colocated", "sharded"), default=None,
                       help="expert mode(s) to deploy and measure one after the other, e.g. `colocated sharded` "
                            "(default colocated)")
    start.add_argument("--num-shards", type=int, default=2, help="expert-shard actors in sharded mode (default 2)")
    start.add_argument("--router-replicas", type=int, default=1, help="router-service replicas (default 1)")
    start.add_argument("--router-gpus", type=float,
                       help="GPUs of all router-service replicas together (default on cuda: 0.9 colocated, "
                            "0.5 sharded; the VisionEncoder gets 0.1)")
    start.add_argument("--gpus-per-shard", type=float, help="GPUs per expert shard (default on cuda: 0.4 / shards)")
    start.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                       help="device of the replicas and shards (default cpu; cuda runs bf16)")
    start.add_argument("--num-cpus", type=int, default=8,
                       help="logical CPUs of the local Ray (default 8: deployments reserve shares of them)")
    load = ap.add_argument_group("load")
    load.add_argument("--target", nargs="+", choices=("grpc", "http"), default=["grpc"],
                      help="grpc: herd.v1.Herd/Generate streaming; http: POST /v1/completions stream=true "
                           "(both: `--target grpc http`; default grpc)")
    load.add_argument("--concurrency", type=int, default=8, help="streams open at once (default 8)")
    load.add_argument("--num-requests", type=int, default=32, help="measured requests (default 32)")
    load.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    load.add_argument("--max-tokens", type=int, default=32,
                      help="output tokens per request; ignore_eos makes every request generate exactly this many "
                           "(default 32)")
    load.add_argument("--warmup", type=int,
                      help="unmeasured requests sent first, at the same concurrency (default: --concurrency, one "
                           "full wave: the first batched prefill after a deploy is slow)")
    load.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    load.add_argument("--token-low", type=int, default=10, help="prompt ids are drawn from [low, high) (default 10)")
    load.add_argument("--token-high", type=int, default=250, help="(default 250: inside every synthetic vocabulary)")
    load.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds (default 600)")
    args = ap.parse_args()
    if args.concurrency < 1 or args.num_requests < 1 or args.prompt_tokens < 1 or args.max_tokens < 1:
        ap.error("--concurrency, --num-requests, --prompt-tokens and --max-tokens must be >= 1")
    if args.warmup is None:
        args.warmup = args.concurrency

    shape = (f"{args.num_requests} requests, concurrency {args.concurrency}, {args.prompt_tokens} prompt tokens, "
             f"{args.max_tokens} output tokens, greedy + ignore_eos")
    if args.start:
        args.experts = list(dict.fromkeys(args.experts or ["colocated"]))
        results, about = run_started(args)
        header = f"local cluster: {about}, {args.device}; {shape}"
    else:
        if args.experts is not None:
            ap.error("--experts needs --start: a running cluster's expert mode is fixed by how it was started")
        grpc_address, http_url = f"{args.address}:{args.grpc_port}", f"http://{args.address}:{args.http_port}"
        results = asyncio.run(run_targets(args, grpc_address, http_url, "cluster"))
        header = f"cluster at {args.address} (gRPC :{args.grpc_port}, HTTP :{args.http_port}); {shape}"
    print_table(results, header)


if __name__ == "__main__":
    main()
