"""`herd up` / `herd status` / `herd down` as a user runs them: the CLI in subprocesses, a real Ray
head and redis-server on free ports, the state file in a temporary HERD_HOME. One `herd up` is
shared by the module; `herd down` runs last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cluster.launcher import _alive, _session_members
from tests.cluster.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PORTS = ("ray", "http", "grpc", "dashboard", "metrics", "redis")


class Herd:
    """`herd` in a subprocess with its own HERD_HOME and ports."""

    def __init__(self, home: Path, **env: str):
        self.home = home
        self.ports = {name: free_port() for name in PORTS}
        self.env = {**os.environ, "HERD_HOME": str(home), "PYTHONPATH": str(ROOT),
                    # a replica that fails to start is retried once, not 3 times (the failure tests)
                    "RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1", **env}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("HERD_API_KEY", None)

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def up(self, *args: str) -> subprocess.CompletedProcess:
        flags = [f for name, port in self.ports.items() for f in (f"--{name}-port", str(port))]
        return self("up", *args, *flags)

    def admin_key(self) -> str:
        return (self.home / "admin-key").read_text().strip()

    def state(self) -> dict:
        return json.loads((self.home / "up.json").read_text())

    def leftovers(self) -> list[str]:
        """Live processes whose command line names this cluster's Ray or Redis port."""
        marks = [f"{sep}{self.ports[name]}" for name in ("ray", "redis", "dashboard") for sep in (":", "=")]
        found = []
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError):
                continue
            if proc.name.isdigit() and _alive(int(proc.name)) and any(
                    cmdline.rstrip().endswith(m) or f"{m} " in cmdline for m in marks):
                found.append(f"{proc.name}: {cmdline[:120]}")
        return found


def generate(herd: Herd, api_key: str | None = None) -> list[int]:
    """Four tokens over gRPC, with `api_key` (default: the admin key that `herd up` made)."""
    from cluster.client import HerdClient, sampling
    from deployments.pb import herd_pb2 as pb

    req = pb.GenerateRequest(text="herd", sampling=sampling(4, 0.0, 1.0, 0, None))
    client = HerdClient(f"127.0.0.1:{herd.ports['grpc']}", timeout_s=60, api_key=api_key or herd.admin_key())
    return [t for chunk in client.generate(req) for t in chunk.token_ids]


def assert_one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("herd up: error: "), out.stderr
    for word in words:
        assert word in line, line


@pytest.fixture(scope="module")
def broken_checkpoint(checkpoint, tmp_path_factory):
    """The checkpoint less one tensor: config.json, tokenizer and weights files all there (the
    checks before Ray pass), the replicas fail to load it."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("broken")
    for f in checkpoint.glob("*.json"):
        (path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors[sorted(tensors)[-1]]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def herd(checkpoint, tmp_path_factory):
    """A herd cluster started by `herd up`; `test_down` stops it (this stops it otherwise)."""
    h = Herd(tmp_path_factory.mktemp("herd-home"))
    out = h.up("--model", str(checkpoint))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert f"http://127.0.0.1:{h.ports['metrics']}/metrics" in out.stdout
    h.up_output = out
    yield h
    if (h.home / "up.json").is_file():
        h("down")


def test_up_makes_an_admin_key_shows_it_once_and_clients_here_use_it(herd, checkpoint):
    key_file = herd.home / "admin-key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    key = herd.admin_key()
    assert f"admin API key (shown once; kept in {key_file}" in herd.up_output.stdout and key in herd.up_output.stdout
    assert key not in (herd.home / "keys.json").read_text()  # the store holds its hash only
    again = herd.up("--model", str(checkpoint))
    assert again.returncode == 0 and key not in again.stdout + again.stderr
    status = herd("status").stdout
    assert f"the admin key is in {key_file}" in status and key not in status
    out = herd("generate", "--address", f"127.0.0.1:{herd.ports['grpc']}", "--prompt", "herd", "--max-tokens", "4",
               "--json")  # finds the admin key by itself
    assert out.returncode == 0 and len(json.loads(out.stdout)["token_ids"]) == 4, out.stderr
    stranger = Herd(herd.home.parent / "elsewhere")  # another machine: no admin key there
    stranger.ports = herd.ports
    out = stranger("generate", "--address", f"127.0.0.1:{herd.ports['grpc']}", "--prompt", "herd")
    assert out.returncode == 1 and "missing API key" in out.stderr and "--api-key" in out.stderr, out.stderr
    out = stranger("generate", "--address", f"127.0.0.1:{herd.ports['grpc']}", "--prompt", "herd", "--max-tokens",
                   "4", "--json", "--api-key", key)
    assert out.returncode == 0, out.stderr


def test_keys_added_and_revoked_with_the_cli_take_effect_at_once(herd):
    from cluster.errors import RequestFailed

    out = herd("keys", "add", "--tenant", "acme")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    key_id = key.split("_")[1]
    assert len(generate(herd, key)) == 4
    listed = herd("keys", "list").stdout
    assert key_id in listed and "acme" in listed and key not in listed
    out = herd("keys", "revoke", key_id)
    assert out.returncode == 0 and f"revoked key {key_id} of tenant acme" in out.stdout, out.stderr
    with pytest.raises(RequestFailed, match="invalid API key") as e:
        generate(herd, key)
    assert e.value.code == "UNAUTHENTICATED"
    assert key_id not in herd("keys", "list").stdout
    assert len(generate(herd)) == 4  # the admin key still works


def test_up_serves_and_records_what_it_started(herd):
    state = herd.state()
    assert state["ray_started"] and state["ray_sid"] and state["redis_pid"]
    assert state["config"]["model"]
    assert len(generate(herd)) == 4
    # the shared cache's secret: made in HERD_HOME, only its path in the deployed config
    secret = herd.home / "cache-secret"
    assert state["config"]["redis"]["secret_file"] == str(secret) and secret.stat().st_mode & 0o077 == 0
    assert secret.read_text().strip() not in (herd.home / "up.json").read_text() + herd.up_output.stdout


def test_up_again_with_the_same_config_does_nothing(herd, checkpoint):
    out = herd.up("--model", str(checkpoint))
    assert out.returncode == 0, out.stderr
    assert "already serving" in out.stdout and "nothing to do" in out.stdout


def test_up_with_another_config_refuses_without_replace(herd, checkpoint, tmp_path):
    config = tmp_path / "herd.yaml"
    config.write_text(f"model: {checkpoint}\nserved_model_name: other\n")
    out = herd.up("--config", str(config))
    assert_one_line_error(out, "already serving", "--replace", "served_model_name")


def test_up_with_a_bad_path_on_a_running_cluster_keeps_serving(herd):
    out = herd.up("--replace", "--model", "/nonexistent")
    assert_one_line_error(out, "/nonexistent")
    assert len(generate(herd)) == 4


def test_up_with_an_invalid_config_says_which_field(herd, checkpoint, tmp_path):
    config = tmp_path / "herd.yaml"
    config.write_text(f"model: {checkpoint}\nrouter_service: {{num_replicas: 0}}\n")
    assert_one_line_error(herd.up("--replace", "--config", str(config)), "router_service.num_replicas")


def test_up_needing_more_gpus_than_the_cluster_has_is_refused(herd, checkpoint, tmp_path):
    config = tmp_path / "herd.yaml"
    config.write_text(f"model: {checkpoint}\nrouter_service: {{num_gpus: 64}}\n")
    assert_one_line_error(herd.up("--replace", "--config", str(config)), "GPUs")


def test_failed_replace_redeploys_the_previous_config(herd, checkpoint, broken_checkpoint):
    out = herd.up("--replace", "--model", str(broken_checkpoint))
    assert_one_line_error(out, str(broken_checkpoint), "CheckpointError", "still serves", str(checkpoint))
    assert len(generate(herd)) == 4
    assert herd.state()["config"]["model"] == str(checkpoint)  # the last good config stays


def test_replace_with_sharded_experts_shows_the_shards_and_their_nodes(herd, checkpoint, tmp_path):
    config = tmp_path / "herd.yaml"
    config.write_text(f"model: {checkpoint}\nexperts: {{mode: sharded, num_shards: 2}}\n")
    out = herd.up("--replace", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert "replacing it: experts.mode: 'colocated' -> 'sharded'" in out.stdout
    assert len(generate(herd)) == 4
    shards = json.loads(herd("status", "--json").stdout)["expert_shards"]
    assert [s["experts"] for s in shards] == ["0-1", "2-3"]
    assert all(s["state"] == "alive" and s["node"] not in ("", "?") for s in shards)
    assert "experts 0-1" in herd("status").stdout


def test_status_lists_model_replicas_and_endpoints(herd, checkpoint):
    out = herd("status")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert str(checkpoint) in text and "RUNNING" in text
    for name in ("RouterService", "Ingress", "VisionEncoder"):
        assert name in text
    metrics = f"http://127.0.0.1:{herd.ports['metrics']}/metrics"
    assert metrics in text and f"http://127.0.0.1:{herd.ports['http']}/v1" in text
    assert f"redis://127.0.0.1:{herd.ports['redis']}: up" in text
    assert "ray_" in httpx.get(metrics, timeout=10).text  # Prometheus text from the fixed port

    info = json.loads(herd("status", "--json").stdout)
    assert info["model"]["checkpoint"] == str(checkpoint) and info["application"] == "RUNNING"
    assert info["deployments"]["RouterService"]["replicas"] == {"RUNNING": 1}


def test_status_says_how_to_authenticate_to_the_dashboard(herd):
    info = json.loads(herd("status", "--json").stdout)
    dashboard = info["endpoints"]["dashboard"]
    if "token authentication is on" not in info["dashboard_auth"]:
        assert "off" in info["dashboard_auth"]
        assert httpx.get(f"{dashboard}/api/version", timeout=10).status_code == 200
        return
    token_file = Path(info["dashboard_auth"].split("the token is in ", 1)[1].split(" (", 1)[0])
    token = token_file.read_text().strip()
    assert httpx.get(f"{dashboard}/api/version", timeout=10).status_code == 401
    with_token = httpx.get(f"{dashboard}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert with_token.status_code == 200


@pytest.fixture
def bystander():
    """Another Ray cluster on this machine (as other tests start): `herd down` must leave it be."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, namespace="herd-tests-bystander",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def test_down_is_quiet_and_stops_only_what_up_started(herd, bystander):
    state = herd.state()
    out = herd("down")
    assert out.returncode == 0, out.stderr
    assert "Termination is unexpected" not in out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "raylet" not in out.stderr.lower()
    assert "stopped the Ray head" in out.stdout and "stopped redis-server" in out.stdout
    assert _session_members(state["ray_sid"]) == {}
    assert not _alive(state["redis_pid"])
    assert herd.leftovers() == []

    @bystander.remote
    def one() -> int:
        return 1

    assert bystander.get(one.remote(), timeout=60) == 1  # the other cluster still runs

    status = herd("status")
    assert status.returncode == 1
    assert status.stderr.strip() == "no herd cluster is running here; start one with `herd up`"
    assert herd("down").returncode == 0


def test_up_with_a_bad_path_and_no_cluster_starts_nothing(tmp_path):
    h = Herd(tmp_path)
    out = h.up("--model", "/nonexistent")
    assert_one_line_error(out, "/nonexistent")
    assert h.leftovers() == [] and not (tmp_path / "up.json").exists()


def test_up_that_fails_to_deploy_stops_what_it_started(tmp_path, broken_checkpoint):
    h = Herd(tmp_path)
    out = h.up("--model", str(broken_checkpoint))
    assert_one_line_error(out, str(broken_checkpoint), "CheckpointError")
    assert h.leftovers() == [] and not (tmp_path / "up.json").exists()
    # nor an admin key that nobody was shown
    assert not (tmp_path / "admin-key").exists() and "admin API key" not in out.stdout
    assert json.loads((tmp_path / "keys.json").read_text()) == {"keys": []}
