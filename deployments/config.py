"""`HerdConfig`: the one validated, immutable description of a deployment. It is the `args` of the
Serve application (`cluster.app:build_app`), the body of `herd up --config FILE`, and what the
Helm chart renders into `serveConfigV2`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.engine.config import EngineConfig
from deployments.redis_address import CREDENTIALS_MESSAGE, RedisAddress, has_credentials, redact
from deployments.routing.registry import REQUEST_ROUTERS
from model.errors import check_known
from model.quantization import QUANTIZATIONS, checkpoint_quantization, served_expert_quantization


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExpertsConfig(_Frozen):
    mode: Literal["colocated", "sharded"] = Field(
        "colocated",
        description="colocated: experts run inside each router-service replica; sharded: in ExpertShard actors",
    )
    num_shards: int = Field(1, ge=1, description="expert-shard actors (sharded mode); experts split evenly")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how the shards' placement group spreads over nodes"
    )
    num_cpus_per_shard: float = Field(1.0, ge=0)
    num_gpus_per_shard: float = Field(0.0, ge=0)
    resources_per_shard: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per shard")
    startup_timeout_s: float = Field(600.0, gt=0,
                                     description="how long a router-service replica waits for the shards to load")
    transport: Literal["collective", "ray"] = Field(
        "collective",
        description="collective: replicas and shards form one expert group (TCP sockets on CPU, NCCL on GPU) and "
        "exchange each MoE layer's rows in lockstep, each shard running the union of all replicas' rows at once; "
        "ray: one Ray actor call per shard and MoE layer (slower; needs no ports between pods beyond Ray's)",
    )
    cpu_group_backend: Literal["socket", "gloo"] = Field(
        "socket", description="collective, shards without GPUs (with GPUs: NCCL): how the group's messages move. "
        "socket: a TCP connection between every two members, read and written by the threads that wait (a decode "
        "row's round trip 2-3x faster than gloo's); gloo: torch.distributed's gloo group (the NCCL code path)")
    micro_batches: int = Field(1, ge=1, le=2, description="collective: split each step in this many micro-batches "
                               "(2: one's attention runs while the other's experts do)")
    group_timeout_s: float = Field(30.0, gt=0, description="collective: timeout of every wait in the expert group "
                                   "(forming it, each exchange); above the longest engine step")
    idle_poll_s: float = Field(0.02, gt=0, description="collective: how long an idle group waits between steps (the "
                               "most a request arriving at an idle cluster waits for its first step)")

    quantization: str = Field(
        "none", description="none | fp8 | int4: quantize the routed experts at load (each expert shard its own "
        "slice). fp8: e4m3, per-output-channel scales, activations per token; int4: weight-only, group 128, bf16 "
        "scales. A checkpoint already in FP8 (Meta's fbgemm_fp8) is served in FP8 (none or fp8; int4 refused)")

    @field_validator("quantization")
    @classmethod
    def _known_quantization(cls, quantization: str) -> str:
        return check_known("expert quantization", quantization, QUANTIZATIONS)


class DeploymentOptions(_Frozen):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(256, ge=1, description="requests a replica runs at once (Serve)")
    max_queued_requests: int = Field(
        64, ge=-1, description="requests waiting for a replica of this deployment (in each caller); more are refused "
        "at once with HTTP 429 / RESOURCE_EXHAUSTED. -1: no limit (Serve's default)")

    @field_validator("max_queued_requests")
    @classmethod
    def _serve_queue(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must be -1 (no limit) or at least 1 (Serve's rule)")
        return v


class LimitsConfig(_Frozen):
    max_images_per_request: int = Field(8, ge=0)
    max_image_bytes: int = Field(20 * 2**20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_body_bytes: int = Field(32 * 2**20, ge=1, description="largest HTTP request body (larger: 413) and gRPC "
                                "request message; room for one image of max_image_bytes as base64")
    max_prompt_chars: int = Field(2_000_000, ge=1, description="characters of prompt text (completion prompt, or "
                                  "all chat messages' text) accepted before tokenizing; more: 400 / INVALID_ARGUMENT")
    request_timeout_s: float = Field(600.0, gt=0, description="a request still running after this long is cancelled "
                                     "(its KV freed) and answered with 504 / DEADLINE_EXCEEDED")
    stream_idle_timeout_s: float = Field(120.0, gt=0, description="a request that produced nothing for this long "
                                         "(waiting for admission included) is cancelled the same way")
    prep_threads: int = Field(4, ge=1, description="threads per Ingress replica that decode bodies, tokenize and "
                              "hash images (off the event loop)")


class VisionOptions(DeploymentOptions):
    max_batch_size: int = Field(8, ge=1, description="images per vision-tower batch (@serve.batch)")
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    cache_bytes: int = Field(512 * 2**20, ge=0, description="bytes of image embeddings kept by image hash "
                             "(LRU; 0: no cache). A Scout-size image's embeddings take up to ~60 MB")



class _CredentialsRemoved(str):
    """A Redis URL that carried credentials, with them removed (see RedisConfig)."""


class RedisConfig(_Frozen):
    """The shared prefix cache (deployments/shared_cache). Redis itself should run with a `maxmemory`
    and `maxmemory-policy allkeys-lru` (what `herd up` and the Helm chart set): it is a cache."""

    url: str = Field(description="redis:// or rediss:// (TLS) URL, without credentials")
    password_env: str | None = Field(None, description="environment variable holding the password (never logged)")
    secret_env: str | None = Field(
        None, description="environment variable holding the secret that keys and authenticates the cached KV "
        "(HMAC-SHA256; at least 16 bytes; never logged). The Helm chart sets it from a Secret")
    secret_file: str | None = Field(
        None, description="file holding that secret instead (herd up makes $HERD_HOME/cache-secret, mode 0600, and "
        "sets this when neither is given)")
    ttl_s: int = Field(86400, ge=1, description="lifetime of a cached KV chunk")
    chunk_tokens: int = Field(256, ge=1, description="tokens per stored KV chunk (a multiple of engine.block_size)")
    fetch_policy: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: fetch only when loading is faster than recomputing (measured at start-up)")
    load_gbps: float | None = Field(None, gt=0, description="Redis load bandwidth in GB/s (default: measured)")
    prefill_tokens_per_s: float | None = Field(None, gt=0, description="prefill speed (default: measured)")
    timeout_s: float = Field(1.0, gt=0, description="per-operation timeout; failures open a circuit breaker")
    cooldown_s: float = Field(5.0, gt=0, description="how long Redis is skipped after failures before a retry")
    max_inflight_mb: int = Field(256, ge=1, description="write-back bytes queued at most; more are dropped")
    maxmemory: str = Field("2gb", description="maxmemory of the redis-server that `herd up` starts")

    @model_validator(mode="before")
    @classmethod
    def _credentials_never_echoed(cls, data):
        """A URL with credentials is refused, and its credentials are removed first: validation
        errors (herd up's message, Serve's deploy log) repeat the value they refused."""
        url = data.get("url") if isinstance(data, dict) else None
        if isinstance(url, str) and has_credentials(url):
            data = {**data, "url": _CredentialsRemoved(redact(url))}
        return data

    @field_validator("url", mode="before")
    @classmethod
    def _no_credentials(cls, url):
        if isinstance(url, _CredentialsRemoved):
            raise ValueError(CREDENTIALS_MESSAGE)
        return url

    @field_validator("url")
    @classmethod
    def _url_is_redis(cls, url: str) -> str:
        RedisAddress.parse(url)  # scheme, no credentials
        return url

    @model_validator(mode="after")
    def _one_secret_source(self) -> RedisConfig:
        if self.secret_env and self.secret_file:
            raise ValueError("redis: give secret_env or secret_file, not both")
        return self


class AuthConfig(_Frozen):
    """API keys and tenants (deployments/auth.py). On by default: a deployment serves only requests
    with a key from its key store, and a key's tenant is the request's tenant."""

    enabled: bool = Field(True, description="false: no keys; the tenant is self-asserted (local play only)")
    keys_file: str | None = Field(None, description="key store JSON file (hashes only; re-read when it changes): "
                                  "`herd keys add` writes it, herd up's is $HERD_HOME/keys.json, on Kubernetes "
                                  "a mounted Secret")
    keys_env: str | None = Field(None, description="environment variable holding a key store's JSON (read at start)")
    shared_anonymous_cache: bool = Field(
        False, description="auth off: requests that name no tenant share one prefix-cache namespace (default: "
        "each gets its own, so no anonymous request can probe another's prompts through cached_tokens)")


class RoutingConfig(_Frozen):
    policy: str = Field(
        "prefix_affinity",
        description="a name from deployments/routing/registry.py. prefix_affinity: same session / same leading prompt "
        "chunks go to the router-service replica that served them last, unless it is overloaded "
        "(deployments/routing/prefix_affinity.py); power_of_two: Serve's default router",
    )
    chunk_tokens: int = Field(256, ge=1, description="prompts match by whole leading chunks of this many tokens")
    overload_fraction: float = Field(
        0.5, gt=0, le=1,
        description="a replica is overloaded (affinity yields to the least-loaded replica) when its ongoing requests "
        "reach this fraction of router_service.max_ongoing_requests",
    )
    max_prefix_entries: int = Field(100_000, ge=1, description="chunk hashes remembered per Ingress replica (LRU)")
    max_sessions: int = Field(100_000, ge=1, description="session ids remembered per Ingress replica (LRU)")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, policy: str) -> str:
        return check_known("routing policy", policy, REQUEST_ROUTERS)


SERVING_MAX_WAITING = 128  # engine.max_waiting when served, unless set: below router_service.max_ongoing_requests


class HerdConfig(_Frozen):
    model: str = Field(description="checkpoint directory (Hugging Face layout)")
    served_model_name: str | None = Field(None, description="the model id clients name (default: directory name)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the replica has a GPU")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    router_service: DeploymentOptions = Field(default_factory=DeploymentOptions, description="the engine replicas")
    vision: VisionOptions = Field(default_factory=VisionOptions)
    ingress: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(num_cpus=0.5))
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    redis: RedisConfig | None = Field(None, description="the Redis server of the shared prefix cache")
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig, description="how the Ingress picks the router-service replica of each request"
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys and tenants")

    @model_validator(mode="before")
    @classmethod
    def _serving_max_waiting(cls, data):
        """Served, the engine refuses beyond SERVING_MAX_WAITING waiting requests unless the config says
        otherwise (EngineConfig's own default, 4096, suits offline batches, not a Serve replica)."""
        if isinstance(data, dict):
            engine = data.get("engine")
            if engine is None:
                data = {**data, "engine": {"max_waiting": SERVING_MAX_WAITING}}
            elif isinstance(engine, dict) and "max_waiting" not in engine:
                data = {**data, "engine": {**engine, "max_waiting": SERVING_MAX_WAITING}}
        return data

    @model_validator(mode="after")
    def _back_pressure_reachable(self) -> HerdConfig:
        """The engine refuses new requests (429) once engine.max_waiting are queued; Serve never sends
        a replica more than router_service.max_ongoing_requests. With max_waiting at or above that,
        the engine's fast refusal could never happen: overload would only queue."""
        if self.engine.max_waiting >= self.router_service.max_ongoing_requests:
            raise ValueError(f"engine.max_waiting ({self.engine.max_waiting}) must be below "
                             f"router_service.max_ongoing_requests ({self.router_service.max_ongoing_requests}): "
                             "otherwise the engine never refuses requests and overload queues instead of getting "
                             "a fast 429 / RESOURCE_EXHAUSTED")
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    def served_precision(self) -> dict[str, str]:
        """`{"weights": bf16 | fp32, "experts": fp8 | int4 | the weights'}` as the router service serves
        this config: bf16 on GPUs, fp32 on the CPU (model.device.default_dtype); the routed experts in
        `experts.quantization`, or FP8 for an FP8 checkpoint (reads its config.json)."""
        on_gpu = self.device == "cuda" or (self.device == "auto" and self.router_service.num_gpus > 0)
        weights = "bf16" if on_gpu else "fp32"
        experts = served_expert_quantization(self.experts.quantization, checkpoint_quantization(self.model))
        return {"weights": weights, "experts": weights if experts == "none" else experts}

    @classmethod
    def from_file(cls, path: str | Path) -> HerdConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))
