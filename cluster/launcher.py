"""`herd up` / `herd down` / `herd status`: a local Ray head, the Serve application, its endpoints."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from cluster.config import HerdConfig

log = logging.getLogger(__name__)
RAY_PORT = 6390  # not 6379: that is Redis's
RAY = str(Path(sys.executable).with_name("ray"))  # the ray CLI of this environment
HTTP_PORT, GRPC_PORT, DASHBOARD_PORT = 8000, 9000, 8265
GRPC_SERVICERS = [
    "deployments.pb.herd_pb2_grpc.add_HerdServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
CACHE = Path.home() / ".cache" / "herd"


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
    subprocess.run([RAY, "start", "--head", f"--port={RAY_PORT}", f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={DASHBOARD_PORT}", "--disable-usage-stats"], check=True,
                   capture_output=True)
    ray.init(address="auto", namespace="herd", log_to_driver=False)


def up(cfg: HerdConfig) -> dict[str, str]:
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.app import build_app

    cfg = cfg.model_copy(update={"model": str(Path(cfg.model).resolve())})  # replicas run elsewhere
    start_ray_head()
    serve.start(http_options={"host": "0.0.0.0", "port": HTTP_PORT},
                grpc_options=gRPCOptions(port=GRPC_PORT, grpc_servicer_functions=GRPC_SERVICERS))
    serve.run(build_app(cfg), name="herd", route_prefix="/")
    return endpoints()


def endpoints() -> dict[str, str]:
    return {"http": f"http://127.0.0.1:{HTTP_PORT}/v1", "grpc": f"127.0.0.1:{GRPC_PORT}",
            "dashboard": f"http://127.0.0.1:{DASHBOARD_PORT}"}


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

    from deployments.expert_shard import NAMESPACE, POOL_NAME

    try:
        ray.init(address="auto", namespace="herd", log_to_driver=False)
        serve.shutdown()
        ray.kill(ray.get_actor(POOL_NAME, namespace=NAMESPACE))
    except (ConnectionError, ValueError):
        pass
    subprocess.run([RAY, "stop", "--force"], check=False, capture_output=True)
