"""`herd up` / `herd down` / `herd status`: a local Ray head, the Serve application, its endpoints."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from deployments.config import HerdConfig, RedisConfig
from deployments.redis_address import redact

log = logging.getLogger(__name__)
RAY_PORT = 6390  # not 6379: that is Redis's
RAY = str(Path(sys.executable).with_name("ray"))  # the ray CLI of this environment
HTTP_PORT, GRPC_PORT, DASHBOARD_PORT = 8000, 9000, 8265
GRPC_SERVICERS = [
    "deployments.pb.herd_pb2_grpc.add_HerdServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
CACHE = Path.home() / ".cache" / "herd"
# MoE dispatches (hidden states of a batch: up to a few MiB) go inline in the task RPC instead of
# through the object store (Ray's default limit is 100 KiB); the Helm chart sets the same.
RAY_ENV = {"RAY_max_direct_call_object_size": str(4 << 20)}
REDIS_PORT = 6379
REDIS_PIDFILE = CACHE / "redis.pid"
STATE = CACHE / "up.json"  # what `herd up` started, for `herd status` / `herd down`


def ensure_checkpoint(preset: str) -> Path:
    """The synthetic checkpoint of `preset`, written on first use."""
    path = CACHE / preset
    if not (path / "config.json").is_file():
        from model.synth import synthesize

        log.info("writing the synthetic %s checkpoint to %s (first run)", preset, path)
        synthesize(path, preset, progress=True)
    return path


def start_ray_head() -> None:
    """Start a local Ray head unless one is running (it outlives this command)."""
    import ray

    try:
        ray.init(address="auto", namespace="herd", log_to_driver=False)
        return
    except ConnectionError:
        pass
    # Logical CPUs, not cores: the Serve proxy, controller and every replica each reserve a share,
    # which would not fit a 2-core machine otherwise; the engine threads share the real cores.
    num_cpus = max(os.cpu_count() or 1, 8)
    env = {**os.environ, **RAY_ENV}
    subprocess.run([RAY, "start", "--head", f"--port={RAY_PORT}", f"--num-cpus={num_cpus}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env)
    ray.init(address="auto", namespace="herd", log_to_driver=False)


def up(cfg: HerdConfig) -> dict[str, str]:
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.app import build_app

    cfg = cfg.model_copy(update={"model": str(Path(cfg.model).resolve())})  # replicas run elsewhere
    if cfg.redis is None:
        cfg = cfg.model_copy(update={"redis": start_local_redis(RedisConfig(url=f"redis://127.0.0.1:{REDIS_PORT}"))})
    start_ray_head()
    serve.start(http_options={"host": "0.0.0.0", "port": HTTP_PORT},
                grpc_options=gRPCOptions(port=GRPC_PORT, grpc_servicer_functions=GRPC_SERVICERS))
    serve.run(build_app(cfg), name="herd", route_prefix="/")
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps({"redis": redact(cfg.redis.url) if cfg.redis else None}))
    return endpoints()


def redis_cache_command(binary: str, port: int, maxmemory: str) -> list[str]:
    """redis-server on loopback run as a cache: no persistence, `maxmemory` with LRU eviction
    (what `herd up`, the tests and the benchmarks start)."""
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"]


def start_local_redis(cfg: RedisConfig) -> RedisConfig | None:
    """A local redis-server for the shared prefix cache, run as a cache: no persistence,
    `maxmemory` with LRU eviction. None (no shared tier) if redis-server is not installed."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        log.warning("redis-server is not installed (apt-get install redis-server): serving without the shared "
                    "prefix cache")
        return None
    if not _redis_answers(cfg.url):
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([*redis_cache_command(redis_server, REDIS_PORT, cfg.maxmemory), "--daemonize", "yes",
                        "--pidfile", str(REDIS_PIDFILE), "--logfile", str(CACHE / "redis.log")], check=True)
        for _ in range(50):
            if _redis_answers(cfg.url):
                break
            time.sleep(0.1)
    return cfg


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def stop_local_redis() -> None:
    if REDIS_PIDFILE.is_file():
        try:
            os.kill(int(REDIS_PIDFILE.read_text().strip()), signal.SIGTERM)
        except (ValueError, ProcessLookupError):
            pass
        REDIS_PIDFILE.unlink(missing_ok=True)


def endpoints() -> dict[str, str]:
    state = json.loads(STATE.read_text()) if STATE.is_file() else {}
    return {"http": f"http://127.0.0.1:{HTTP_PORT}/v1", "grpc": f"127.0.0.1:{GRPC_PORT}",
            "dashboard": f"http://127.0.0.1:{DASHBOARD_PORT}", "redis": state.get("redis") or "none"}


def status() -> dict:
    import ray
    from ray import serve

    ray.init(address="auto", namespace="herd", log_to_driver=False)
    apps = serve.status().applications
    deployments = {name: {"status": str(d.status), "replicas": dict(d.replica_states)}
                   for app in apps.values() for name, d in app.deployments.items()}
    return {"endpoints": endpoints(), "applications": {n: str(a.status) for n, a in apps.items()},
            "deployments": deployments}


def down() -> None:
    import ray
    from ray import serve

    from deployments.expert_shard import kill_pool

    try:
        ray.init(address="auto", namespace="herd", log_to_driver=False)
        serve.shutdown()
        kill_pool()
    except (ConnectionError, ValueError):
        pass
    subprocess.run([RAY, "stop", "--force"], check=False, capture_output=True)
    stop_local_redis()
    STATE.unlink(missing_ok=True)
