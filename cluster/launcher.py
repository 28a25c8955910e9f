"""`herd up` / `herd down` / `herd status`: a local Ray head, the Serve application, its endpoints.

`herd up` checks everything it can before it touches Ray (the checkpoint, the config, the GPUs and
ports), then starts what is missing (a redis-server for the shared prefix cache, a Ray head) and
deploys. What it started, on which ports, and the last config that deployed are kept in the state
file (`$HERD_HOME/up.json`, default `~/.cache/herd/up.json`), which `herd status` and `herd down` read.

Ownership: `herd down` stops only what `herd up` started. `ray stop` stops every Ray process of the
machine, so herd never runs it: `herd up` starts `ray start --head` in a new session (setsid), every
process of that head stays in it (its workers too: they get process groups of their own, not
sessions) and `herd down` signals the processes of that session. A head that was already running on
the Ray port is used as is and left running (only the herd application and its expert shards are
removed from it); the same holds for a Redis that already answers on the Redis port.

Replace semantics: a second `herd up` on a cluster that already serves Herd with the same config
does nothing (exit 0); with another config it refuses (exit 1, naming what runs and what would
change) unless `--replace`. With `--replace` the new config is checked before Ray is touched and,
if its deployment still fails, the previous config (kept in the state file) is deployed again.

Linux only (sessions are read from /proc).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.errors import CliError
from cluster.home import herd_home
from deployments.redis_address import RedisAddress, redact

if TYPE_CHECKING:  # deployments.config imports torch: `herd --help` imports this module
    from deployments.config import HerdConfig, RedisConfig

log = logging.getLogger(__name__)
RAY = str(Path(sys.executable).with_name("ray"))  # the ray CLI of this environment
GRPC_SERVICERS = [
    "deployments.pb.herd_pb2_grpc.add_HerdServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
APP = "herd"
NAMESPACE = "herd"
# MoE dispatches (hidden states of a batch: up to a few MiB) go inline in the task RPC instead of
# through the object store (Ray's default limit is 100 KiB); the Helm chart sets the same.
# Serve's gRPC proxy reads messages up to 2 GiB by default: 64 MiB here (the Ingress then refuses
# those above limits.max_body_bytes, 32 MiB by default, with INVALID_ARGUMENT); the chart sets the same.
RAY_ENV = {"RAY_max_direct_call_object_size": str(4 << 20), "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(64 << 20)}


def state_file() -> Path:
    return herd_home() / "up.json"


def cache_secret_file() -> Path:
    """`$HERD_HOME/cache-secret`: the secret that keys and authenticates the shared prefix cache's
    Redis keys and values, made on first use (64 hex characters, mode 0600) and kept across runs
    (a new secret means a cold cache). Only its path goes into the config the replicas get."""
    path = herd_home() / "cache-secret"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".cache-secret.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    try:
        os.link(tmp, path)  # atomic, and never replaces a secret another herd up made meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path


def with_cache_secret(cfg: RedisConfig) -> RedisConfig:
    """`cfg` with `secret_file` set to `cache_secret_file()` unless it names another secret (a
    config that names herd's own file, as a redeployed one does, gets a new file if it was deleted:
    how the secret is rotated)."""
    default = (herd_home() / "cache-secret").resolve()  # absolute: the replicas run in other directories
    if cfg.secret_env or (cfg.secret_file and Path(cfg.secret_file).resolve() != default):
        return cfg
    return cfg.model_copy(update={"secret_file": str(cache_secret_file().resolve())})


@dataclass(frozen=True)
class Ports:
    """The ports `herd up` uses (flags of `herd up`; kept in the state file for status and down)."""

    ray: int = 6390  # the Ray head's GCS (not 6379: that is Redis's)
    http: int = 8000  # Serve's HTTP proxy: the OpenAI API
    grpc: int = 9000  # Serve's gRPC proxy: herd.v1.Herd
    dashboard: int = 8265  # the Ray dashboard
    metrics: int = 8080  # the head's Prometheus endpoint (`ray start --metrics-export-port`)
    redis: int = 6379  # the local redis-server of the shared prefix cache


class ClusterError(CliError):
    """An expected failure of up / down / status: the message says what is wrong and what to do
    (the CLI prints it as one line, no traceback)."""


@dataclass
class State:
    """What `herd up` started and deployed (the state file)."""

    ports: Ports = field(default_factory=Ports)
    ray_started: bool = False  # herd up started the Ray head: herd down stops it
    ray_sid: int | None = None  # the session of that head's processes (`ray start`'s pid)
    redis_url: str | None = None  # the shared prefix cache's Redis (redacted), None if none
    redis_pid: int | None = None  # set when herd up started that redis-server: herd down stops it
    ray_auth: str | None = None  # the head's RAY_AUTH_MODE ("token" or "disabled"), None if unknown
    config: dict | None = None  # the last HerdConfig that deployed (what a failed --replace restores)

    @classmethod
    def read(cls) -> State | None:
        path = state_file()
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(**{**data, "ports": Ports(**data.get("ports", {}))})
        except (ValueError, TypeError):
            log.warning("ignoring the unreadable state file %s", path)
            return None

    def write(self) -> None:
        path = state_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


def ensure_checkpoint(preset: str) -> Path:
    """The synthetic checkpoint of `preset`, written on first use."""
    path = herd_home() / preset
    if not (path / "config.json").is_file():
        from model.synth import synthesize

        log.info("writing the synthetic %s checkpoint to %s (first run)", preset, path)
        synthesize(path, preset, progress=True)
    return path


# ---- checks before Ray -------------------------------------------------------------------------

def check_model(cfg: HerdConfig) -> None:
    """The checkpoint can be served: config.json, tokenizer.json, the weights, the image processor
    (vision models) and, for sharded experts, at most one shard per expert. ClusterError otherwise."""
    from model.checkpoint import INDEX_FILE, image_processor, tensor_files
    from model.config import Llama4Config
    from model.errors import HerdModelError
    from model.quantization import checkpoint_quantization, served_expert_quantization
    from model.tokenizer import Tokenizer

    path = Path(cfg.model)
    if not path.is_dir():
        raise ClusterError(f"model directory {path} does not exist: pass --model DIR with a Hugging Face Llama 4 "
                           "checkpoint (config.json, tokenizer.json, *.safetensors), or --preset for a synthetic one")
    try:
        model_cfg = Llama4Config.from_dir(path)
        Tokenizer.from_dir(path)
        files = set(tensor_files(path).values())
        missing = sorted(str(f) for f in files if not f.is_file())
        if missing:
            raise ClusterError(f"{path / INDEX_FILE} names weight files that are missing: {', '.join(missing[:3])}")
        image_processor(path, model_cfg)
        served_expert_quantization(cfg.experts.quantization, checkpoint_quantization(path))  # int4 of an FP8 one
    except HerdModelError as e:
        raise ClusterError(f"cannot serve {path}: {e}") from None
    if cfg.experts.mode == "sharded":
        experts = model_cfg.text.num_local_experts
        if cfg.experts.num_shards > experts:
            raise ClusterError(f"experts.num_shards is {cfg.experts.num_shards} but {path} has {experts} experts: "
                               "at most one shard per expert")


def resources_needed(cfg: HerdConfig) -> dict[str, float]:
    """Ray resources of every replica and expert shard of `cfg` together."""
    need: dict[str, float] = {"CPU": 0.0, "GPU": 0.0}
    for opts in (cfg.router_service, cfg.vision, cfg.ingress):
        need["CPU"] += opts.num_replicas * opts.num_cpus
        need["GPU"] += opts.num_replicas * opts.num_gpus
    if cfg.experts.mode == "sharded":
        shards = cfg.experts.num_shards
        need["CPU"] += shards * cfg.experts.num_cpus_per_shard
        need["GPU"] += shards * cfg.experts.num_gpus_per_shard
        for name, amount in cfg.experts.resources_per_shard.items():
            need[name] = need.get(name, 0.0) + shards * amount
    return need


def check_resources(cfg: HerdConfig, have: dict[str, float], where: str) -> None:
    """ClusterError when `cfg` needs more of a resource (GPUs, CPUs, custom) than `have`."""
    if cfg.device == "cuda" and not have.get("GPU"):
        raise ClusterError(f"device is cuda but {where} has no GPU: set device: auto (or cpu)")
    for name, amount in resources_needed(cfg).items():
        if amount > have.get(name, 0.0) + 1e-9:
            what = {"GPU": "GPUs", "CPU": "CPUs"}.get(name, f"of the resource {name!r}")
            raise ClusterError(f"the config needs {amount:g} {what} (replicas x num_gpus/num_cpus, plus the expert "
                               f"shards) but {where} has {have.get(name, 0.0):g}: lower them in the config, or run "
                               "where there are more")


def check_gpu_memory(cfg: HerdConfig, gpus: int, gpu_memory_bytes: int) -> None:
    """Refuse a deployment whose weights and KV cache do not fit the GPUs: the arithmetic of `herd
    plan` (cluster/plan.py) on this config, one line saying what to change."""
    from cluster.plan import PlanDoesNotFit, check_fits, plan_for_config

    try:
        check_fits(plan_for_config(cfg, gpus, gpu_memory_bytes))
    except PlanDoesNotFit as e:
        raise ClusterError(f"{e} (see `herd plan --model {cfg.model} --gpus {gpus} "
                           f"--gpu-memory {gpu_memory_bytes / 2**30:.0f}`)") from None


def _check_local_gpus(cfg: HerdConfig) -> None:
    """On a machine with GPUs that the deployment will use, check that it fits them."""
    import torch

    if cfg.device != "cpu" and torch.cuda.is_available():
        check_gpu_memory(cfg, torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory)


def machine_resources() -> dict[str, float]:
    """What the head `herd up` starts on this machine will offer (`start_ray_head`)."""
    import torch

    return {"CPU": float(_head_cpus()), "GPU": float(torch.cuda.device_count())}


def _head_cpus() -> int:
    # Logical CPUs, not cores: the Serve proxy, controller and every replica each reserve a share,
    # which would not fit a 2-core machine otherwise; the engine threads share the real cores.
    return max(os.cpu_count() or 1, 8)


def _port_answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def check_ports_free(ports: Ports, names: list[str]) -> None:
    for name in names:
        port = getattr(ports, name)
        if _port_answers(port):
            raise ClusterError(f"port {port} (--{name}-port) is in use by another program: pass --{name}-port "
                               "with a free port")


# ---- processes herd starts and stops -----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


AUTH_MODE_ENV = "RAY_AUTH_MODE"


def _token_available() -> bool:
    from ray._raylet import AuthenticationTokenLoader

    return bool(AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))


def head_auth_mode() -> str:
    """The authentication mode of the head herd starts: $RAY_AUTH_MODE if set, else Ray token
    authentication (what `ray.init` gives a new cluster), with a token generated into
    ~/.ray/auth_token (`ray get-auth-token --generate`) if there is none."""
    mode = os.environ.get(AUTH_MODE_ENV, "token").lower()
    if mode == "token" and not _token_available():
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True)
    return mode


def probe_auth_mode(ports: Ports) -> str:
    """The authentication mode of a head herd did not start: its dashboard says (a public route);
    else token if a token is available (what `ray start` does)."""
    import urllib.error
    import urllib.request

    if os.environ.get(AUTH_MODE_ENV):
        return os.environ[AUTH_MODE_ENV].lower()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.dashboard}/api/authentication_mode", timeout=2) as r:
            return str(json.loads(r.read()).get("authentication_mode", "disabled"))
    except (urllib.error.URLError, OSError, ValueError):
        return "token" if _token_available() else "disabled"


def start_ray_head(ports: Ports, auth_mode: str) -> int:
    """Start a Ray head on `ports` in a new session; the session id (what `stop_session` stops)."""
    env = {**os.environ, **RAY_ENV, AUTH_MODE_ENV: auth_mode}
    cmd = [RAY, "start", "--head", f"--port={ports.ray}", f"--num-cpus={_head_cpus()}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={ports.dashboard}",
           f"--metrics-export-port={ports.metrics}", "--disable-usage-stats",
           # the Ray client server and the dashboard agent default to fixed ports (10001, 52365),
           # which a second head on the machine would collide on
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        stop_session(proc.pid)  # whatever it had started
        last = [line for line in out.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise ClusterError(f"`ray start` failed on port {ports.ray}: {last[0].strip()}")
    return proc.pid


def _session_members(sid: int) -> dict[int, str]:
    """pid -> command name of the live (not zombie) processes of session `sid`."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if rest[0] != "Z" and int(rest[3]) == sid:  # state ppid pgrp session
            members[int(entry.name)] = comm
    return members


def _wait_gone(pids, timeout_s: float) -> set[int]:
    """The pids of `pids` still alive (not zombies) after waiting up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = {pid for pid in pids if _alive(pid)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_session(sid: int, grace_s: float = 5.0) -> int:
    """Stop a Ray head started by `start_ray_head` (the processes of its session) the way `ray stop`
    orders it: the raylet first (the agents fate-share with it), then the rest, the GCS last;
    SIGTERM, then SIGKILL after `grace_s`. Returns how many processes it stopped; 0 (and nothing
    signalled) when the session holds no Ray process any more (its id may have been reused)."""
    members = _session_members(sid)
    if not any(comm in ("raylet", "gcs_server") or comm.startswith("ray") for comm in members.values()):
        return 0
    raylets = [pid for pid, comm in members.items() if comm == "raylet"]
    gcs = [pid for pid, comm in members.items() if comm == "gcs_server"]
    for batch in (raylets, [pid for pid in members if pid not in raylets and pid not in gcs], gcs):
        for pid in batch:
            _signal(pid, signal.SIGTERM)
        for pid in _wait_gone(batch, grace_s / 3):
            _signal(pid, signal.SIGKILL)
    # workers the raylet started while we stopped it
    for pid in _session_members(sid):
        _signal(pid, signal.SIGKILL)
    _wait_gone(members, 2.0)
    return len(members)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def redis_cache_command(binary: str, port: int, maxmemory: str) -> list[str]:
    """redis-server on loopback run as a cache: no persistence, `maxmemory` with LRU eviction
    (what `herd up`, the tests and the benchmarks start)."""
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"]


def start_local_redis(cfg: RedisConfig, port: int) -> tuple[RedisConfig | None, int | None]:
    """A redis-server on `port` for the shared prefix cache, run as a cache. Returns the config
    (None: no shared tier, redis-server is not installed) and the pid of the redis-server it started
    (None if one already answered there)."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        log.warning("redis-server is not installed (apt-get install redis-server): serving without the shared "
                    "prefix cache")
        return None, None
    if _redis_answers(cfg.url):
        return cfg, None
    if _port_answers(port):
        raise ClusterError(f"port {port} (--redis-port) is in use by a program that is not Redis: pass --redis-port "
                           "with a free port")
    home = herd_home()
    home.mkdir(parents=True, exist_ok=True)
    pidfile = home / f"redis-{port}.pid"
    pidfile.unlink(missing_ok=True)
    started = subprocess.run([*redis_cache_command(redis_server, port, cfg.maxmemory), "--daemonize", "yes",
                              "--pidfile", str(pidfile), "--logfile", str(home / f"redis-{port}.log")],
                             capture_output=True, text=True)
    if started.returncode != 0:
        why = (started.stderr or started.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ClusterError(f"redis-server did not start on port {port}: {why[0]}")
    for _ in range(100):
        if pidfile.is_file() and _redis_answers(cfg.url):
            return cfg, int(pidfile.read_text().strip())
        time.sleep(0.1)
    raise ClusterError(f"redis-server did not start on port {port}: see {home / f'redis-{port}.log'}")


def _redis_client(url: str, password_env: str | None = None):
    import redis

    address = RedisAddress.parse(url)
    password = os.environ.get(password_env) if password_env else None
    return redis.Redis(host=address.host, port=address.port, db=address.db, ssl=address.tls, password=password,
                       socket_timeout=0.5, socket_connect_timeout=0.5)


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(_redis_client(url).ping())
    except redis.RedisError:
        return False


def _is_redis(pid: int, port: int) -> bool:
    """Whether process `pid` is a live redis-server on `port` (its pid was not reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return _alive(pid) and "redis-server" in cmdline and f":{port}" in cmdline


def stop_redis(pid: int, port: int) -> bool:
    """Stop the redis-server `herd up` started (pid `pid`, on `port`); False if that pid is no
    longer that redis-server."""
    if not _is_redis(pid, port):
        return False
    _signal(pid, signal.SIGTERM)
    for pid_left in _wait_gone([pid], 5.0):
        _signal(pid_left, signal.SIGKILL)
    return True


# ---- Ray connection ----------------------------------------------------------------------------

def connect(ports: Ports, auth_mode: str) -> None:
    """Connect this process to the head on `ports.ray` (never `address="auto"`: that may be any
    cluster of the machine, e.g. a test's), in the head's authentication mode (Ray does not enable
    token authentication by itself for an explicit address)."""
    import ray
    from ray._raylet import Config

    logging.getLogger("ray").setLevel(logging.WARNING)
    if not ray.is_initialized():
        os.environ[AUTH_MODE_ENV] = auth_mode
        Config.initialize("")  # what Ray does after setting it (ray._private.authentication)
        try:
            ray.init(address=f"127.0.0.1:{ports.ray}", namespace=NAMESPACE, log_to_driver=False,
                     logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as e:
            raise ClusterError(f"cannot connect to the Ray head on 127.0.0.1:{ports.ray} ({e}); if it uses Ray "
                               f"token authentication, set {AUTH_MODE_ENV}=token and make its token available "
                               "(~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
    import ray.serve  # it sets its logger up when imported: quieten it after

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its own INFO lines ("Started Serve", ...)


def disconnect() -> None:
    """Disconnect the driver (before its raylet stops: else Ray prints that the raylet died)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _name(status) -> str:
    """A Serve status enum as its bare name (RUNNING, HEALTHY, ...)."""
    return str(getattr(status, "value", status))


def _app_status():
    """Serve's status of the herd application, None when Serve or the app is not running."""
    from ray import serve

    try:
        return serve.status().applications.get(APP)
    except Exception:  # Serve not started on this cluster
        return None


# ---- deploy ------------------------------------------------------------------------------------

def _deploy(cfg: HerdConfig | dict, previous: dict | None) -> None:
    from ray import serve

    from cluster.app import build_app
    from deployments.config import HerdConfig
    from deployments.expert_shard import kill_pool

    new = cfg if isinstance(cfg, HerdConfig) else HerdConfig.model_validate(cfg)
    if previous is not None and _pool_key(new) != _pool_key(HerdConfig.model_validate(previous)):
        kill_pool()  # the pool is one named actor: other experts must not reuse the old shards
    serve.run(build_app(new), name=APP, route_prefix="/")


def _pool_key(cfg: HerdConfig) -> object:
    """What the expert shards of a deployment depend on (a change needs new shards)."""
    return (cfg.experts.mode == "sharded" and (cfg.model, cfg.experts.model_dump(), cfg.device,
                                               cfg.engine.model_dump()))


def deploy_failure(app=None) -> str:
    """One line saying why the herd application failed to deploy (the exception of the first failed
    deployment, from Serve's status) and the whole of Serve's messages in a log file."""
    app = app or _app_status()
    if app is None:
        return "the application is gone"
    messages = [f"{name}: {d.message}" for name, d in app.deployments.items()
                if d.message and "HEALTHY" not in str(d.status)] or [app.message or str(app.status)]
    log_file = herd_home() / "deploy-error.log"
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("\n\n".join(messages) + "\n")
        where = f" (Serve's messages: {log_file})"
    except OSError:
        where = ""
    return _exception_line(messages[0]) + where


_EXCEPTION = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit|Interrupt))(?:\(\w+\))?: (.+)$")


def _exception_line(message: str) -> str:
    """`Name: message` of the last exception line of a traceback in `message`, else its first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if m := _EXCEPTION.match(line):
            return f"{m.group(1)}: {m.group(2)}"
    return lines[0] if lines else "unknown error"


def config_changes(old: dict, new: dict) -> list[str]:
    """`a.b: old -> new` for every setting that differs (flattened)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in d.items():
            if isinstance(value, dict) and value:
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def up(cfg: HerdConfig, ports: dict[str, int] | None = None, replace_app: bool = False,
       say: Callable[[str], None] = print) -> State:
    """Check, start what is missing, deploy `cfg`. `ports`: overrides of `Ports` (a running herd
    cluster keeps its own). Raises ClusterError, leaving the cluster as it found it: with nothing
    it started still running, and a herd application that was serving still serving (its config
    redeployed if the new one failed)."""
    from deployments.config import RedisConfig

    cfg = cfg.model_copy(update={"model": str(Path(cfg.model).resolve())})  # replicas run elsewhere
    check_model(cfg)
    cfg, new_admin_key = with_auth(cfg)
    ports = {k: v for k, v in (ports or {}).items() if v is not None}
    state = State.read()
    if state is not None and not _port_answers(state.ports.ray):
        log.info("the herd cluster of %s is gone: starting afresh", state_file())
        state_file().unlink(missing_ok=True)
        new = State(ports=Ports(**ports))
        if state.redis_pid and _is_redis(state.redis_pid, new.ports.redis):
            new.redis_pid = state.redis_pid  # the redis-server it started still runs: still ours to stop
        state = None
    elif state is not None:
        moved = [f"--{k}-port {getattr(state.ports, k)}, not {v}" for k, v in ports.items()
                 if getattr(state.ports, k) != v]
        if moved:
            raise ClusterError(f"the running herd cluster uses {'; '.join(moved)}: leave those flags out, or "
                               "`herd down` first")
        new = replace(state)
    else:
        new = State(ports=Ports(**ports))
    head_running = _port_answers(new.ports.ray)
    if not head_running:
        check_resources(cfg, machine_resources(), "this machine")
        _check_local_gpus(cfg)
        check_ports_free(new.ports, ["dashboard", "metrics", "http", "grpc"])

    started_ray = started_redis = None
    try:
        if cfg.redis is None:
            redis_cfg, started_redis = start_local_redis(
                RedisConfig(url=f"redis://127.0.0.1:{new.ports.redis}"), new.ports.redis)
            cfg = cfg.model_copy(update={"redis": redis_cfg})
            if started_redis is not None:
                new.redis_pid = started_redis
        if cfg.redis is not None:
            cfg = cfg.model_copy(update={"redis": with_cache_secret(cfg.redis)})
        new.redis_url = redact(cfg.redis.url) if cfg.redis else None
        if not head_running:
            new.ray_auth = head_auth_mode()
            started_ray = start_ray_head(new.ports, new.ray_auth)
            new.ray_started, new.ray_sid = True, started_ray
        elif new.ray_auth is None:
            new.ray_auth = probe_auth_mode(new.ports)
        connect(new.ports, new.ray_auth)
        import ray

        check_resources(cfg, ray.cluster_resources(), "the Ray cluster")
        _deploy_checked(cfg, new, replace_app, say)
    except BaseException:
        disconnect()
        if started_ray is not None:
            stop_session(started_ray)
        if started_redis is not None:
            stop_redis(started_redis, new.ports.redis)
        if new_admin_key is not None:
            from cluster.keys import forget_admin_key

            forget_admin_key(Path(cfg.auth.keys_file or ""), new_admin_key[1])
        raise
    new.config = cfg.model_dump()
    new.write()
    disconnect()
    if new_admin_key is not None:
        from cluster.keys import admin_key_file

        say(f"admin API key (shown once; kept in {admin_key_file()}, mode 0600, where herd chat and herd generate "
            f"find it): {new_admin_key[0]}")
    return new


def with_auth(cfg: HerdConfig) -> tuple[HerdConfig, tuple[str, str] | None]:
    """`cfg` with its key store: with auth on and no keys configured, herd up's own
    ($HERD_HOME/keys.json) and an admin key made on first start ((key, id) returned, else None).
    A key store the config names must be readable (ClusterError otherwise)."""
    from cluster.keys import default_keys_file, ensure_admin_key
    from deployments.auth import KeyStore, KeyStoreError

    auth = cfg.auth
    if not auth.enabled:
        return cfg, None
    if auth.keys_file or auth.keys_env:
        try:
            KeyStore(auth.keys_file, auth.keys_env)
        except KeyStoreError as e:
            raise ClusterError(str(e)) from None
        return cfg, None
    keys_file = default_keys_file()
    try:
        new_key = ensure_admin_key(keys_file)
    except (OSError, KeyStoreError) as e:
        raise ClusterError(f"cannot set up the API key store {keys_file}: {e}") from None
    return cfg.model_copy(update={"auth": auth.model_copy(update={"keys_file": str(keys_file)})}), new_key


def _deploy_checked(cfg: HerdConfig, new: State, replace_app: bool, say: Callable[[str], None]) -> None:
    from ray import serve
    from ray.serve.config import gRPCOptions

    current = _app_status()
    previous = new.config if current is not None and "RUNNING" in str(current.status) else None
    if current is not None:
        was = previous["model"] if previous else f"an application ({_name(current.status)})"
        changes = config_changes(previous, cfg.model_dump()) if previous else ["(its config is unknown)"]
        if not replace_app:
            if previous is not None and not changes:
                say(f"herd is already serving {was} with this config: nothing to do")
                return
            raise ClusterError(f"herd is already serving {was}; `herd up --replace` would redeploy it with "
                               f"{'; '.join(changes)}; `herd down` stops it")
        say(f"herd is already serving {was}; replacing it: {'; '.join(changes) or 'same config (a restart)'}")
    try:
        serve.start(http_options={"host": "0.0.0.0", "port": new.ports.http},
                    grpc_options=gRPCOptions(port=new.ports.grpc, grpc_servicer_functions=GRPC_SERVICERS))
    except Exception as e:  # Serve raises RuntimeError or its own errors when its proxies cannot start
        raise ClusterError(f"Serve could not start on http port {new.ports.http} / grpc port {new.ports.grpc}: "
                           f"{e}; pass free --http-port / --grpc-port") from None
    try:
        _deploy(cfg, previous)
        return
    except RuntimeError:
        cause = deploy_failure()
    if previous is None:
        if current is None:
            serve.delete(APP)
            _kill_pool()
        raise ClusterError(f"deploying {cfg.model} failed: {cause}")
    say(f"deploying {cfg.model} failed; restoring {previous['model']}")
    _restore(previous, cfg)
    raise ClusterError(f"deploying {cfg.model} failed: {cause}; herd still serves {previous['model']}")


def _restore(previous: dict, failed: HerdConfig) -> None:
    """Redeploy `previous` over the application that `failed` to deploy. Serve can still report the
    failed application's status when the redeploy starts (seen on a loaded 2-core machine: the
    redeploy "failed" with the broken checkpoint's error), so a second try deletes the application
    first and deploys `previous` afresh (a short gap in serving rather than a broken app)."""
    from ray import serve

    for attempt in range(2):
        try:
            _deploy(previous, failed.model_dump())
            return
        except RuntimeError:
            if attempt == 1:
                raise ClusterError(f"deploying {failed.model} failed, and restoring the previous config failed "
                                   f"too: {deploy_failure()}") from None
            log.warning("restoring %s failed (%s); deleting the application and deploying it afresh",
                        previous["model"], deploy_failure())
            serve.delete(APP)


def _kill_pool() -> None:
    from deployments.expert_shard import kill_pool

    kill_pool()


# ---- status ------------------------------------------------------------------------------------

NOT_RUNNING = "no herd cluster is running here; start one with `herd up`"


def status() -> dict | None:
    """The served model, its deployments and replicas, its expert shards, endpoints and Redis tier;
    None when no herd cluster is running (no state file, or its Ray head does not answer)."""
    import ray

    state = State.read()
    if state is None or not _port_answers(state.ports.ray):
        return None
    connect(state.ports, state.ray_auth or probe_auth_mode(state.ports))
    try:
        app = _app_status()
        cfg = state.config or {}
        head = next((n for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})),
                    {})
        metrics_port = head.get("MetricsExportPort") or state.ports.metrics
        out = {
            "model": {"name": cfg.get("served_model_name") or Path(cfg.get("model", "?")).name,
                      "checkpoint": cfg.get("model")},
            "application": _name(app.status) if app else "not deployed",
            "deployments": {name: {"status": _name(d.status),
                                   "replicas": {_name(k): v for k, v in d.replica_states.items()}}
                            for name, d in (app.deployments.items() if app else [])},
            "expert_shards": _expert_shards(cfg),
            "endpoints": {
                "http": f"http://127.0.0.1:{state.ports.http}/v1",
                "grpc": f"127.0.0.1:{state.ports.grpc}",
                "dashboard": f"http://127.0.0.1:{state.ports.dashboard}",
                "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            },
            "dashboard_auth": dashboard_auth(state.ports.dashboard),
            "api_auth": api_auth(cfg.get("auth") or {}),
            "redis": _redis_health(state.redis_url, (cfg.get("redis") or {}).get("password_env")),
            "ray_head": {"address": f"127.0.0.1:{state.ports.ray}", "started_by_herd": state.ray_started},
        }
        if app is not None and "RUNNING" not in str(app.status):
            out["problem"] = deploy_failure(app)
        return out
    finally:
        disconnect()


def _expert_shards(cfg: dict) -> list[dict] | None:
    """Each expert shard's experts and node, None when experts are colocated."""
    import ray

    from deployments.expert_shard import NAMESPACE as POOL_NAMESPACE
    from deployments.expert_shard import POOL_NAME

    if (cfg.get("experts") or {}).get("mode") != "sharded":
        return None
    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
    try:
        pool = ray.get_actor(POOL_NAME, namespace=POOL_NAMESPACE)
        shards = ray.get(pool.shards_and_ranges.remote(), timeout=5)
    except (ValueError, ray.exceptions.RayError):
        return []
    out = []
    for handle, (start, stop) in shards:
        try:
            node = nodes.get(ray.get(handle.info.remote(), timeout=5)["node_id"], "?")
            state = "alive"
        except ray.exceptions.RayError:
            node, state = "?", "not answering"
        out.append({"experts": f"{start}-{stop - 1}", "node": node, "state": state})
    return out


def dashboard_auth(port: int) -> str:
    """How to get into the dashboard: nothing, or where Ray's token is (never the token itself)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/authentication_mode", timeout=2) as r:
            mode = json.loads(r.read()).get("authentication_mode")
    except (urllib.error.URLError, OSError, ValueError):
        return "the dashboard does not answer"
    if mode != "token":
        return "none (Ray token authentication is off)"
    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "the RAY_AUTH_TOKEN environment variable"
    else:
        where = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return (f"Ray token authentication is on: the token is in {where} (`ray get-auth-token` prints it); paste it "
            "when the dashboard asks, or send `Authorization: Bearer <token>`")


def api_auth(auth: dict) -> str:
    """How clients authenticate to the APIs: where the admin key and the key store are (never a key)."""
    from cluster.keys import admin_key_file, default_keys_file

    if not auth.get("enabled", True):
        return "off (herd up --no-auth): no API keys, tenants are self-asserted; do not expose the ports"
    where = [f"key store {auth['keys_file']}"] if auth.get("keys_file") else []
    where += [f"keys from ${auth['keys_env']}"] if auth.get("keys_env") else []
    admin = (f"; the admin key is in {admin_key_file()} (herd chat / generate use it; elsewhere --api-key or "
             "HERD_API_KEY)") if auth.get("keys_file") == str(default_keys_file()) else ""
    return (f"API keys required (Authorization: Bearer <key>; gRPC metadata authorization): {', '.join(where)}"
            f"{admin}; `herd keys add --tenant NAME` makes a key")


def _redis_health(url: str | None, password_env: str | None) -> dict:
    import redis

    if url is None:
        return {"url": None, "health": "no shared prefix cache (redis-server not installed)"}
    try:
        client = _redis_client(url, password_env)
        info = client.info("memory")
        return {"url": url, "health": "up", "used_memory": info.get("used_memory_human"),
                "maxmemory": info.get("maxmemory_human"), "keys": client.dbsize()}
    except redis.RedisError as e:
        return {"url": url, "health": f"unreachable ({e}): prefills recompute, requests still succeed"}


# ---- down --------------------------------------------------------------------------------------

def down() -> list[str]:
    """Stop what `herd up` started: its Ray head (with everything on it) and its redis-server; on a
    head herd did not start, remove only the herd application and its expert shards. Lines saying
    what it did."""
    state = State.read()
    if state is None:
        return [NOT_RUNNING.split(";")[0] + "; nothing to stop"]
    done = []
    if state.ray_started and state.ray_sid:
        # no driver connects: a driver attached to a raylet that stops prints the raylet's log
        stopped = stop_session(state.ray_sid)
        done.append(f"stopped the Ray head on port {state.ports.ray} ({stopped} processes)" if stopped else
                    f"the Ray head on port {state.ports.ray} had already stopped")
    elif _port_answers(state.ports.ray):
        from ray import serve

        connect(state.ports, state.ray_auth or probe_auth_mode(state.ports))
        try:
            if _app_status() is not None:
                serve.delete(APP)
            _kill_pool()
            if not serve.status().applications:
                serve.shutdown()
        finally:
            disconnect()
        done.append(f"removed the herd application; left the Ray head on port {state.ports.ray} running "
                    "(herd up did not start it)")
    if state.redis_pid:
        if stop_redis(state.redis_pid, state.ports.redis):
            done.append(f"stopped redis-server on port {state.ports.redis}")
    elif state.redis_url:
        done.append(f"left Redis at {state.redis_url} running (herd up did not start it)")
    state_file().unlink(missing_ok=True)
    return done
