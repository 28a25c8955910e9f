"""Soak and overload benchmark (a script, not a test): many concurrent streaming clients against a
Herd cluster for a long time, with faults, reporting what must hold for a cluster left running.

Soak (`--mode soak`): `--clients` (64) concurrent clients, each sending one streaming request after
another for `--duration` seconds (600), half over gRPC and half over OpenAI HTTP: chat prompts that
share a long document prefix (the prefix caches' case), `--image-fraction` of them with an image,
`--cancel-fraction` (5%) dropped midway. At `--kill-at` of the run one expert shard is killed (Ray
restarts it) and at `--redis-restart-at` the redis-server is killed and started again. Reported:
- failed requests, separating those in flight at the kill (which must get UNAVAILABLE / 503 and
  never hang) and those sent while the shard restarted, from every other failure (must be 0);
  a request that gets no answer for `--request-timeout` counts as hung;
- KV blocks in use, running and waiting sequences after the run (Ray's metrics endpoint: must be 0);
- resident memory of the herd processes (Serve replicas, expert shards) after warm-up vs the end;
- p50 / p99 time to first token and inter-token latency per `--bucket-s` (60 s) of the run.

Overload (`--mode overload`): `--overload-factor` (8) x the cluster's capacity as streaming
requests: `capacity` long ones fill it, the rest arrive one every `--overload-gap-ms` while those
run; every refusal must come as HTTP 429 / gRPC RESOURCE_EXHAUSTED in under 100 ms (send -> status,
measured by the client), and every accepted request must complete. Capacity: router-service
replicas x max_ongoing_requests + the handle's max_queued_requests (with `--start`, from the
overload config below, whose Ingress door admits about as many; else `--capacity`).

    # start a cluster of its own (`herd up` on free ports, its own HERD_HOME, sharded experts, a local
    # redis-server), run both modes, stop it:
    python bench/soak.py --start --preset tiny-scout --duration 600 --mode both

    # against a running `herd up` of this machine (faults need its HERD_HOME state: the Ray head and
    # the redis-server it started):
    python bench/soak.py --http http://127.0.0.1:8000 --grpc 127.0.0.1:9000 --metrics http://127.0.0.1:8080/metrics

With authentication on, pass `--api-key` (or set HERD_API_KEY): HTTP sends `Authorization: Bearer
KEY`, gRPC the same as `authorization` metadata. Exit status 0 when every check held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats import percentile

REPO = Path(__file__).resolve().parents[1]
HERD = [sys.executable, "-m", "cluster.cli"]  # this checkout's herd (cwd: REPO), whatever pip installed
PROCESS_PREFIXES = ("ray::ServeReplica:herd:", "ray::ExpertShard")  # the processes whose memory is watched
REFUSAL_BUDGET_S = 0.100


# ---- one request ------------------------------------------------------------------------------

@dataclass
class Result:
    api: str
    start: float
    end: float = 0.0
    ttft: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival time of each token-carrying chunk
    outcome: str = "ok"  # ok | cancelled | refused | error | hung
    status: str = ""  # the error's gRPC code / HTTP status
    message: str = ""
    first_answer_s: float | None = None  # send -> first byte of an answer (response headers / first message)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


def _auth_headers(api_key: str | None) -> dict:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def _image(rng: random.Random) -> bytes:
    from PIL import Image

    w, h = rng.randint(32, 400), rng.randint(32, 400)
    img = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Clients:
    def __init__(self, http: str, grpc_address: str, api_key: str | None, timeout_s: float, connections: int):
        import grpc
        import httpx

        from deployments.pb import herd_pb2 as pb
        from deployments.pb import herd_pb2_grpc

        self.grpc, self.pb, self.timeout_s = grpc, pb, timeout_s
        self.http = httpx.AsyncClient(base_url=http.rstrip("/"), headers=_auth_headers(api_key),
                                      timeout=httpx.Timeout(timeout_s, connect=30),
                                      limits=httpx.Limits(max_connections=connections + 8))
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.channel = grpc.aio.insecure_channel(grpc_address, options=[("grpc.max_send_message_length", -1)])
        self.stub = herd_pb2_grpc.HerdStub(self.channel)

    async def close(self) -> None:
        await self.http.aclose()
        await self.channel.close()

    async def request(self, api: str, system: str, question: str, image: bytes | None, max_tokens: int,
                      cancel_after: int | None, seed: int) -> Result:
        res = Result(api, time.monotonic())
        try:
            await asyncio.wait_for(
                (self._http if api == "http" else self._grpc)(res, system, question, image, max_tokens, cancel_after,
                                                              seed), self.timeout_s)
        except TimeoutError:
            res.outcome, res.message = "hung", f"no end within {self.timeout_s:g} s"
        except Exception as e:
            res.outcome, res.message = "error", f"{type(e).__name__}: {e}"[:200]
        res.end = time.monotonic()
        return res

    def _token(self, res: Result) -> None:
        now = time.monotonic()
        if res.ttft is None:
            res.ttft = now - res.start
        res.token_times.append(now)

    async def _http(self, res, system, question, image, max_tokens, cancel_after, seed) -> None:
        content: list | str = question
        if image is not None:
            url = "data:image/png;base64," + base64.b64encode(image).decode()
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": content}],
                "max_tokens": max_tokens, "temperature": 0.7, "seed": seed, "ignore_eos": True, "stream": True}
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            res.first_answer_s = time.monotonic() - res.start
            if r.status_code != 200:
                await r.aread()
                res.status = str(r.status_code)
                res.outcome = "refused" if r.status_code == 429 else "error"
                res.message = r.text[:200]
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    res.outcome, res.status = "error", str(event["error"].get("code"))
                    res.message = event["error"].get("message", "")[:200]
                    return
                if event["choices"] and (event["choices"][0]["delta"].get("content") or
                                         event["choices"][0]["finish_reason"]):
                    self._token(res)
                if cancel_after is not None and len(res.token_times) >= cancel_after:
                    res.outcome = "cancelled"
                    return  # leaving the context closes the connection: the server cancels

    async def _grpc(self, res, system, question, image, max_tokens, cancel_after, seed) -> None:
        pb = self.pb
        parts = ([pb.ContentPart(image=image)] if image is not None else []) + [pb.ContentPart(text=question)]
        req = pb.GenerateRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role="system", content=[pb.ContentPart(text=system)]),
                                           pb.ChatMessage(role="user", content=parts)]),
            sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=seed, ignore_eos=True))
        call = self.stub.Generate(req, metadata=self.metadata)
        try:
            async for chunk in call:
                if res.first_answer_s is None:
                    res.first_answer_s = time.monotonic() - res.start
                if chunk.token_ids or chunk.finish_reason:
                    self._token(res)
                if cancel_after is not None and len(res.token_times) >= cancel_after:
                    res.outcome = "cancelled"
                    call.cancel()
                    return
        except self.grpc.aio.AioRpcError as e:
            res.first_answer_s = res.first_answer_s or time.monotonic() - res.start
            res.status = e.code().name
            res.outcome = "refused" if e.code() == self.grpc.StatusCode.RESOURCE_EXHAUSTED else "error"
            res.message = (e.details() or "")[:200]


# ---- the cluster: started here (herd up) or given -----------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`herd up` / `herd down` in a HERD_HOME of its own, on free ports."""

    def __init__(self, home: Path, preset: str):
        self.home, self.preset = home, preset
        self.ports = {name: _free_port() for name in ("ray", "http", "grpc", "dashboard", "metrics", "redis")}
        self.env = {**os.environ, "HERD_HOME": str(home)}
        self.checkpoint = home / f"ckpt-{preset}"
        self.http = f"http://127.0.0.1:{self.ports['http']}"
        self.grpc = f"127.0.0.1:{self.ports['grpc']}"
        self.metrics = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        self.up_once = False

    def _herd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([*HERD, *args], env=self.env, capture_output=True, text=True, cwd=REPO)
        if check and r.returncode != 0:
            raise SystemExit(f"herd {' '.join(args)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
        return r

    def up(self, config: dict) -> None:
        if not (self.checkpoint / "config.json").is_file():
            self._herd("synth", "--preset", self.preset, "--out", str(self.checkpoint))
        path = self.home / "config.yaml"
        path.write_text(json.dumps({"model": str(self.checkpoint), **config}))  # JSON is YAML
        ports = [a for name, port in self.ports.items() for a in (f"--{name}-port", str(port))]
        started = time.monotonic()
        r = self._herd("up", "--config", str(path), *ports, *(["--replace"] if self.up_once else []))
        self.up_once = True
        print(f"herd up ({time.monotonic() - started:.0f} s): {r.stdout.strip().splitlines()[-1:]}", flush=True)

    def down(self) -> None:
        self._herd("down", check=False)


# ---- faults (a child process: the Ray driver stays out of the clients' process) ------------------

def _fault_server() -> None:
    """Run in a child process with HERD_HOME set: connect to the cluster first (slow on a loaded
    machine), print "ready", then run each command read from stdin (kill-shard, restart-redis) at
    once and print one line about it."""
    from cluster.launcher import State, connect, disconnect, herd_home, probe_auth_mode, start_local_redis
    from deployments.config import RedisConfig

    state = State.read()
    if state is None:
        raise SystemExit(f"no herd state in {herd_home()}: cannot inject faults")
    import ray

    from deployments.expert_shard import NAMESPACE, POOL_NAME

    connect(state.ports, state.ray_auth or probe_auth_mode(state.ports))
    try:
        pool = ray.get_actor(POOL_NAME, namespace=NAMESPACE)
        print("ready", flush=True)
        for line in sys.stdin:
            kind = line.strip()
            if kind == "kill-shard":
                shard, (lo, hi) = ray.get(pool.shards_and_ranges.remote(), timeout=30)[0]
                ray.kill(shard, no_restart=False)  # Ray restarts it; its experts reload
                print(f"killed the expert shard of experts {lo}-{hi - 1}", flush=True)
            elif kind == "restart-redis":
                if not state.redis_pid:
                    print("herd up did not start the redis-server here: not restarted", flush=True)
                    continue
                os.kill(state.redis_pid, signal.SIGKILL)
                for _ in range(100):
                    if not Path(f"/proc/{state.redis_pid}").exists():
                        break
                    time.sleep(0.05)
                time.sleep(2.0)  # down for a while: lookups and writes fail, the breaker opens
                port = state.ports.redis
                _, pid = start_local_redis(RedisConfig(url=f"redis://127.0.0.1:{port}"), port)
                state.redis_pid = pid
                state.write()  # herd down stops the new one
                print(f"redis-server killed, down 2 s, restarted on port {port} (pid {pid})", flush=True)
    finally:
        disconnect()


class Faults:
    """The fault child: started (and connected) before the clients, so a fault lands on time."""

    async def start(self, env: dict) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--fault-server", env=env, cwd=REPO, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        line = await self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise SystemExit(f"the fault injector did not start: {line.decode(errors='replace')!r}")

    async def inject(self, kind: str) -> tuple[float, str]:
        """Run the fault; (when it was sent, what the child said)."""
        when = time.monotonic()
        self.proc.stdin.write(kind.encode() + b"\n")
        await self.proc.stdin.drain()
        return when, (await self.proc.stdout.readline()).decode(errors="replace").strip()

    async def close(self) -> None:
        self.proc.stdin.close()
        await self.proc.wait()


# ---- measurements beside the clients --------------------------------------------------------------

def herd_rss(home: str | None) -> dict[str, int]:
    """Resident bytes of the herd processes on this machine, summed by process title; with `home`,
    only those of the cluster started with that HERD_HOME (other clusters may run beside it)."""
    out: dict[str, int] = {}
    marker = f"HERD_HOME={home}".encode() if home else None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not title.startswith(PROCESS_PREFIXES):
                continue
            if marker is not None and marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            rss = next(int(line.split()[1]) * 1024 for line in (proc / "status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
        role = title.split()[0].split(".")[0]
        out[role] = out.get(role, 0) + rss
    return out


def scrape(metrics_url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each metric summed over its series (replicas, groups); absent metrics are left out."""
    import httpx

    text = httpx.get(metrics_url, timeout=10).text
    sums: dict[str, float] = {}
    for line in text.splitlines():
        for name in names:
            if line.startswith(name + "{") or line.startswith(name + " "):
                sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


IDLE_METRICS = ("ray_herd_kv_blocks_used", "ray_herd_running_sequences", "ray_herd_waiting_sequences")


async def wait_idle(metrics_url: str, timeout_s: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            values = await asyncio.to_thread(scrape, metrics_url, IDLE_METRICS)
        except Exception as e:
            values = {"error": str(e)}  # type: ignore[dict-item]
        if (all(values.get(n, 0) == 0 for n in IDLE_METRICS) and "error" not in values) or \
                time.monotonic() > deadline:
            return values
        await asyncio.sleep(2)


# ---- the soak run --------------------------------------------------------------------------------

WORDS = ("herd llama expert shard router cache token prefix stream batch kernel tensor replica redis "
         "gradient context window attention decode prefill latency memory block scheduler").split()


def document(rng: random.Random, words: int) -> str:
    sentences, n = [], 0
    while n < words:
        k = rng.randint(6, 14)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n += k
    return "Read this document and answer the question after it.\n\n" + " ".join(sentences)


async def soak(args, clients: Clients, metrics_url: str, fault_env: dict | None, home: str | None) -> bool:
    rng = random.Random(args.seed)
    system = document(rng, args.doc_words)
    injector = None
    if fault_env is not None and not args.no_faults:
        injector = Faults()
        await injector.start(fault_env)
    start = time.monotonic()
    end = start + args.duration
    results: list[Result] = []
    faults: dict[str, tuple[float, str]] = {}
    rss_samples: list[tuple[float, dict[str, int]]] = []
    images = [_image(rng) for _ in range(8)]

    async def client(n: int) -> None:
        crng = random.Random(args.seed * 1000 + n)
        api = "grpc" if n % 2 else "http"
        while time.monotonic() < end:
            max_tokens = crng.randint(args.max_tokens // 2, args.max_tokens)
            cancel = crng.randint(1, max_tokens - 1) if crng.random() < args.cancel_fraction else None
            image = crng.choice(images) if crng.random() < args.image_fraction else None
            question = f"Question {crng.randint(0, 10**6)}: what does the document say about {crng.choice(WORDS)}?"
            results.append(await clients.request(api, system, question, image, max_tokens, cancel,
                                                 crng.randint(0, 2**31)))

    async def sample_memory() -> None:
        while time.monotonic() < end:
            rss_samples.append((time.monotonic() - start, await asyncio.to_thread(herd_rss, home)))
            await asyncio.sleep(args.rss_every_s)

    async def fault(kind: str, at: float) -> None:
        await asyncio.sleep(max(0.0, start + at * args.duration - time.monotonic()))
        faults[kind] = await injector.inject(kind)
        print(f"[{faults[kind][0] - start:6.1f} s] {kind}: {faults[kind][1]}", flush=True)

    tasks = [asyncio.create_task(client(n)) for n in range(args.clients)]
    tasks.append(asyncio.create_task(sample_memory()))
    if injector is not None:
        tasks += [asyncio.create_task(fault("kill-shard", args.kill_at)),
                  asyncio.create_task(fault("restart-redis", args.redis_restart_at))]
    await asyncio.gather(*tasks)
    if injector is not None:
        await injector.close()
    rss_samples.append((time.monotonic() - start, await asyncio.to_thread(herd_rss, home)))
    idle = await wait_idle(metrics_url)
    return report_soak(args, results, faults, rss_samples, idle, start)


def report_soak(args, results: list[Result], faults: dict, rss_samples, idle: dict, start: float) -> bool:
    ok = True
    kill_at = faults.get("kill-shard", (None, ""))[0]
    done = [r for r in results if r.outcome == "ok"]
    cancelled = [r for r in results if r.outcome == "cancelled"]
    failed = [r for r in results if r.outcome not in ("ok", "cancelled")]
    in_flight = [r for r in failed if kill_at is not None and r.start <= kill_at <= r.end]
    # sent after the kill and failed before any request succeeded again: the shard was restarting
    recovered_at = min((r.end for r in done if kill_at is not None and r.start > kill_at), default=None)
    restarting = [r for r in failed if r not in in_flight and kill_at is not None and r.start > kill_at
                  and (recovered_at is None or r.end <= recovered_at)]
    other = [r for r in failed if r not in in_flight and r not in restarting]
    print(f"\n== soak: {args.clients} clients, {args.duration:.0f} s: {len(results)} requests "
          f"({len(done)} completed, {len(cancelled)} cancelled on purpose, {len(failed)} failed)")
    for kind, (when, what) in faults.items():
        print(f"  fault {kind} at {when - start:.1f} s: {what}")
    unavailable = {"UNAVAILABLE", "503"}
    bad_kill = [r for r in in_flight if r.status not in unavailable or r.outcome == "hung"]
    print(f"  in flight at the shard kill and failed: {len(in_flight)} "
          f"({len(in_flight) - len(bad_kill)} UNAVAILABLE/503; {len(bad_kill)} otherwise or hung)")
    for r in bad_kill[:5]:
        print(f"    {r.api} {r.outcome} {r.status}: {r.message}")
    print(f"  sent while the shard restarted and failed: {len(restarting)} "
          f"({sum(r.status in unavailable for r in restarting)} UNAVAILABLE/503)")
    print(f"  other failures (must be 0): {len(other)}")
    by_kind: dict[str, int] = {}
    for r in other:
        key = f"{r.api} {r.outcome} {r.status} {r.message[:100]}"
        by_kind[key] = by_kind.get(key, 0) + 1
    for key, n in sorted(by_kind.items(), key=lambda kv: -kv[1])[:10]:
        print(f"    {n} x {key}")
    hung = [r for r in results if r.outcome == "hung"]
    ok &= not other and not bad_kill and not hung
    print(f"  hung (no end within {args.request_timeout:g} s): {len(hung)}")
    print("  after the run (metrics endpoint): " + ", ".join(f"{k.removeprefix('ray_herd_')} {v:g}"
                                                             for k, v in idle.items()))
    ok &= all(idle.get(n, 0) == 0 for n in IDLE_METRICS) and "error" not in idle
    warm = [s for s in rss_samples if s[0] >= args.warmup_s]
    if len(warm) >= 2:
        first, last = warm[0][1], warm[-1][1]
        total0, total1 = sum(first.values()), sum(last.values())
        growth = (total1 - total0) / total0 * 100 if total0 else float("nan")
        print(f"  resident memory of the herd processes after warm-up ({warm[0][0]:.0f} s): "
              f"{total0 / 2**20:.0f} MiB -> {total1 / 2**20:.0f} MiB at the end ({growth:+.1f}%; must be <= 5%)")
        for role in sorted(set(first) | set(last)):
            a, b = first.get(role, 0), last.get(role, 0)
            print(f"    {role:45s} {a / 2**20:8.0f} -> {b / 2**20:8.0f} MiB")
        ok &= growth <= 5
    else:
        print(f"  resident memory: too few samples after the {args.warmup_s:g} s warm-up")
    print(f"  latency per {args.bucket_s:g} s (completed and cancelled requests; TTFT by request start, ITL by "
          f"token arrival):")
    print(f"    {'from s':>7} {'requests':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
    served = done + cancelled
    for b in range(int(args.duration // args.bucket_s) + 1):
        lo, hi = start + b * args.bucket_s, start + (b + 1) * args.bucket_s
        ttfts = [r.ttft for r in served if r.ttft is not None and lo <= r.start < hi]
        itls = [t1 - t0 for r in served for t0, t1 in zip(r.token_times, r.token_times[1:], strict=False)
                if lo <= t1 < hi]
        if not ttfts and not itls:
            continue
        ms = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
        print(f"    {b * args.bucket_s:7.0f} {len(ttfts):8d} {ms(percentile(ttfts, 50)):>9} "
              f"{ms(percentile(ttfts, 99)):>9} {ms(percentile(itls, 50)):>8} {ms(percentile(itls, 99)):>8}  ms")
    print(f"  soak: {'PASS' if ok else 'FAIL'}")
    return ok


# ---- the overload run ----------------------------------------------------------------------------

# The engine holds max_num_seqs + max_waiting = the router service's max_ongoing_requests, 4 more
# wait in the Ingress's handle: 12 accepted. The Ingress's own Serve limits are the door: beyond them
# Serve's proxy refuses before any work (no body read, no tokenizing); past the door the Ingress
# refuses beyond its share of the router service (12) before tokenizing.
OVERLOAD_CONFIG = dict(
    ingress={"max_ongoing_requests": 12, "max_queued_requests": 2},
    router_service={"num_replicas": 1, "max_ongoing_requests": 8, "max_queued_requests": 4},
    engine={"max_num_seqs": 4, "max_waiting": 4},
)


def overload_capacity(config: dict) -> int:
    r = config["router_service"]
    return r["num_replicas"] * r["max_ongoing_requests"] + r["max_queued_requests"]


async def overload(args, clients: Clients, capacity: int) -> bool:
    """`capacity` long streams fill the cluster; then the other (factor - 1) x capacity requests
    arrive one every `--overload-gap-ms` while those run: each must be refused at once (or, when a
    slot freed up, accepted and completed)."""
    n = args.overload_factor * capacity
    rng = random.Random(args.seed + 1)
    system = document(rng, args.doc_words // 4)

    def send(k: int, max_tokens: int) -> asyncio.Task:
        return asyncio.create_task(clients.request("grpc" if k % 2 else "http", system, f"Question {k}?", None,
                                                   max_tokens, None, k))

    start = time.monotonic()
    filling = [send(k, args.overload_max_tokens * 4) for k in range(capacity)]
    await asyncio.sleep(args.overload_fill_s)  # the first ones are admitted and streaming
    excess = []
    for k in range(capacity, n):
        excess.append(send(k, args.overload_max_tokens))
        await asyncio.sleep(args.overload_gap_ms / 1000)
    results = await asyncio.gather(*filling, *excess)
    wall = time.monotonic() - start
    refused = [r for r in results if r.outcome == "refused"]
    accepted = [r for r in results if r.outcome != "refused"]
    failed = [r for r in accepted if r.outcome != "ok"]
    times = [r.first_answer_s for r in refused if r.first_answer_s is not None]
    slow = [t for t in times if t >= REFUSAL_BUDGET_S]
    print(f"\n== overload: {n} streaming requests ({args.overload_factor} x capacity {capacity}): {capacity} to fill "
          f"it, then one every {args.overload_gap_ms:g} ms; {wall:.1f} s")
    print(f"  refused (429 / RESOURCE_EXHAUSTED): {len(refused)} "
          f"(http {sum(r.api == 'http' for r in refused)}, grpc {sum(r.api == 'grpc' for r in refused)})")
    if times:
        print(f"  time to refusal: p50 {percentile(times, 50) * 1000:.0f} ms, p99 {percentile(times, 99) * 1000:.0f} "
              f"ms, max {max(times) * 1000:.0f} ms; at or over {REFUSAL_BUDGET_S * 1000:.0f} ms: {len(slow)}")
    def source(r: Result) -> str:  # the Ingress's messages quote Serve's, so they are matched first
        if "requests of this Ingress replica" in r.message:
            return "the Ingress (its share of the router service is taken: refused before any work)"
        if "the cluster is at capacity" in r.message:
            return "the Ingress (the router service's queue is full)"
        if "already waiting" in r.message:
            return "the engine (engine.max_waiting)"
        if "backpressure" in r.message:
            return "Serve's proxy (the Ingress door is full)"
        return "unknown"

    for where in sorted({source(r) for r in refused}):
        by = [r.first_answer_s for r in refused if source(r) == where and r.first_answer_s is not None]
        if by:
            print(f"    by {where}: {len(by)}, p50 {percentile(by, 50) * 1000:.0f} ms, max {max(by) * 1000:.0f} ms")
    print(f"  accepted: {len(accepted)}, completed {len(accepted) - len(failed)}, failed {len(failed)}")
    for r in failed[:5]:
        print(f"    {r.api} {r.outcome} {r.status}: {r.message}")
    ok = bool(refused) and not slow and not failed
    print(f"  overload: {'PASS' if ok else 'FAIL'}")
    return ok


# ---- main ----------------------------------------------------------------------------------------

SOAK_CONFIG = dict(experts={"mode": "sharded", "num_shards": 2}, router_service={"num_replicas": 1})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fault-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("soak", "overload", "both"), default="soak")
    p.add_argument("--start", action="store_true", help="start a cluster with `herd up` (own HERD_HOME, free ports)")
    p.add_argument("--preset", default="small-scout", help="synthetic checkpoint with --start (default small-scout)")
    p.add_argument("--http", default="http://127.0.0.1:8000", help="HTTP endpoint of a running cluster")
    p.add_argument("--grpc", default="127.0.0.1:9000", help="gRPC endpoint of a running cluster")
    p.add_argument("--metrics", default="http://127.0.0.1:8080/metrics", help="Ray's Prometheus endpoint")
    p.add_argument("--api-key", help="API key (default: $HERD_API_KEY, else the admin key of the cluster that "
                   "--start or this machine's `herd up` made)")
    p.add_argument("--duration", type=float, default=600, help="soak seconds (default 600)")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (default 64)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request: between half this and this")
    p.add_argument("--doc-words", type=int, default=600, help="words of the shared document prefix (default 600)")
    p.add_argument("--image-fraction", type=float, default=0.1)
    p.add_argument("--cancel-fraction", type=float, default=0.05)
    p.add_argument("--kill-at", type=float, default=0.35, help="kill a shard at this fraction of the run")
    p.add_argument("--redis-restart-at", type=float, default=0.65, help="restart redis-server at this fraction")
    p.add_argument("--no-faults", action="store_true")
    p.add_argument("--warmup-s", type=float, default=None, help="memory baseline after this (default min(60, 1/4))")
    p.add_argument("--bucket-s", type=float, default=60, help="latency table rows (default 60 s)")
    p.add_argument("--rss-every-s", type=float, default=5)
    p.add_argument("--request-timeout", type=float, default=300, help="a request longer than this counts as hung")
    p.add_argument("--capacity", type=int, help="overload without --start: requests the cluster accepts at once")
    p.add_argument("--overload-factor", type=int, default=8)
    p.add_argument("--overload-max-tokens", type=int, default=32, help="tokens of an excess request (the filling "
                   "ones: 4x this)")
    p.add_argument("--overload-fill-s", type=float, default=3.0, help="wait after filling before the excess")
    p.add_argument("--overload-gap-ms", type=float, default=20.0, help="between two excess requests")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.fault_server:
        _fault_server()
        return 0
    if args.warmup_s is None:
        args.warmup_s = min(60.0, args.duration / 4)
    return asyncio.run(run(args))


def api_key(explicit: str | None, cluster: Cluster | None) -> str | None:
    """--api-key, else $HERD_API_KEY, else the admin key `herd up` made (the started cluster's, or
    this machine's), as `herd chat` finds it; None when auth is off and no key exists."""
    from cluster.keys import API_KEY_ENV, client_api_key

    if cluster is None:
        return client_api_key(explicit)
    admin = cluster.home / "admin-key"
    return explicit or os.environ.get(API_KEY_ENV) or (admin.read_text().strip() if admin.is_file() else None)


async def run(args) -> int:
    cluster = None
    if args.start:
        home = Path(tempfile.mkdtemp(prefix="herd-soak-"))
        cluster = Cluster(home, args.preset)
        args.http, args.grpc, args.metrics = cluster.http, cluster.grpc, cluster.metrics
    ok = True
    try:
        if args.mode in ("soak", "both"):
            fault_env = None
            if cluster is not None:
                cluster.up(SOAK_CONFIG)
                fault_env = cluster.env
            else:
                from cluster.launcher import state_file

                fault_env = dict(os.environ) if state_file().is_file() else None  # faults need herd up's state
            args.api_key = api_key(args.api_key, cluster)
            clients = Clients(args.http, args.grpc, args.api_key, args.request_timeout, args.clients)
            try:
                ok &= await soak(args, clients, args.metrics, fault_env, str(cluster.home) if cluster else None)
            finally:
                await clients.close()
        if args.mode in ("overload", "both"):
            if cluster is not None:
                cluster.up(OVERLOAD_CONFIG)
                capacity = overload_capacity(OVERLOAD_CONFIG)
            elif args.capacity:
                capacity = args.capacity
            else:
                raise SystemExit("--mode overload against a running cluster needs --capacity")
            args.api_key = api_key(args.api_key, cluster)
            clients = Clients(args.http, args.grpc, args.api_key, args.request_timeout,
                              args.overload_factor * capacity)
            try:
                ok &= await overload(args, clients, capacity)
            finally:
                await clients.close()
    finally:
        if cluster is not None:
            cluster.down()
            shutil.rmtree(cluster.home, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
