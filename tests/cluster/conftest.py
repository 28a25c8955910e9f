"""A real local Ray cluster running the Herd Serve application on a synthetic checkpoint."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

from model.synth import synthesize

GRPC_SERVICERS = [
    "deployments.pb.herd_pb2_grpc.add_HerdServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


# Deliberately off for the tests that are not about authentication (tests/cluster/test_auth.py is).
NO_AUTH = {"enabled": False, "shared_anonymous_cache": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-scout")
    synthesize(path, "tiny-scout", seed=3, dtype=torch.float32, progress=False)
    return path


class Served:
    def __init__(self, http_port: int, grpc_port: int, model_dir, metrics_port: int | None = None):
        self.http = f"http://127.0.0.1:{http_port}"
        self.grpc = f"127.0.0.1:{grpc_port}"
        self.model_dir = model_dir
        self.metrics = f"http://127.0.0.1:{metrics_port}/metrics"  # Ray's Prometheus endpoint (this node)

    def metric(self, name: str, label: str = "", timeout_s: float = 40) -> float:
        """The sum of a metric over every series (replica) on Ray's Prometheus endpoint, once exported."""
        import time

        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            lines = [line for line in httpx.get(self.metrics, timeout=5).text.splitlines()
                     if line.startswith(name + "{") and label in line]
            if lines or time.monotonic() > deadline:
                return sum(float(line.rsplit(" ", 1)[1]) for line in lines)
            time.sleep(1)

    def deploy(self, **config) -> None:
        """(Re)deploy the app with this HerdConfig and wait until it is running. Without `auth` in
        `config` API keys are off and anonymous requests share one cache namespace (NO_AUTH): the
        tests that are not about authentication call it as clients did before keys existed."""
        from ray import serve

        from cluster.app import build_app
        from deployments.expert_shard import kill_pool

        kill_pool()
        config.setdefault("auth", NO_AUTH)
        redis = config.get("redis")
        if redis is not None and not (redis.get("secret_env") or redis.get("secret_file")):
            config["redis"] = {**redis, "secret_file": cache_secret_file()}
        serve.run(build_app({"model": str(self.model_dir), **config}), name="herd", route_prefix="/")


def cache_secret_file() -> str:
    """A shared-cache secret file for deployments whose test is not about the secret."""
    path = Path(tempfile.gettempdir()) / f"herd-test-cache-secret-{os.getpid()}"
    if not path.exists():
        path.write_text("cluster-test-secret-0123456789abcdef")
        path.chmod(0o600)
    return str(path)


def start_serve(http_port: int, grpc_port: int) -> None:
    from ray import serve
    from ray.serve.config import gRPCOptions

    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))


def init_local_ray(**kwargs) -> None:
    """`ray.init` of a fresh local instance, tried once more when Ray's own processes fail to start
    (seen once in a full run on the 2-core machine: "The current node timed out during startup",
    the next module's start fine): a failure to start Ray, not of the code under test."""
    import ray

    try:
        ray.init(**kwargs)
    except Exception as e:
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        ray.init(**kwargs)


@pytest.fixture(scope="module")
def served(checkpoint):
    import ray
    from ray import serve

    metrics_port = free_port()
    init_local_ray(address="local", num_cpus=8, include_dashboard=False, namespace="herd-tests", log_to_driver=False,
                   _metrics_export_port=metrics_port)
    http_port, grpc_port = free_port(), free_port()
    start_serve(http_port, grpc_port)
    yield Served(http_port, grpc_port, checkpoint, metrics_port)
    serve.shutdown()
    ray.shutdown()


class RedisServer:
    """A real redis-server on a free port, run as a cache (no persistence, LRU), restartable."""

    def __init__(self, tmp_path):
        import shutil

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not installed: `apt-get install redis-server` (make test does it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.dir = tmp_path
        self.proc = None
        self.start()

    def start(self) -> None:
        import subprocess
        import time

        import redis

        from cluster.launcher import redis_cache_command

        self.proc = subprocess.Popen([*redis_cache_command(self.binary, self.port, "256mb"), "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                if redis.Redis(port=self.port).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        pytest.fail("redis-server did not start")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def client(self):
        import redis

        return redis.Redis(port=self.port)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()
