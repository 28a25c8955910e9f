"""`HerdConfig`: the one validated, immutable description of a deployment. It is the `args` of the
Serve application (`cluster.app:build_app`), the body of `herd up --config FILE`, and what the
Helm chart renders into `serveConfigV2`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from deployments.engine.config import EngineConfig


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExpertsConfig(_Frozen):
    mode: Literal["colocated", "sharded"] = Field(
        "colocated", description="colocated: experts run inside each Router; sharded: in ExpertShard actors"
    )
    num_shards: int = Field(1, ge=1, description="expert-shard actors (sharded mode); experts split evenly")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how the shards' placement group spreads over nodes"
    )
    num_cpus_per_shard: float = Field(1.0, ge=0)
    num_gpus_per_shard: float = Field(0.0, ge=0)
    resources_per_shard: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per shard")
    startup_timeout_s: float = Field(600.0, gt=0, description="how long a Router waits for the shards to load")


class DeploymentOptions(_Frozen):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)


class LimitsConfig(_Frozen):
    max_images_per_request: int = Field(8, ge=0)
    max_image_bytes: int = Field(20 * 2**20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)


class VisionOptions(DeploymentOptions):
    max_batch_size: int = Field(8, ge=1, description="images per vision-tower batch (@serve.batch)")
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    cache_size: int = Field(256, ge=0, description="image embeddings kept by image hash")


class RedisConfig(_Frozen):
    url: str = Field(description="redis:// or rediss:// URL, without credentials")
    password_env: str | None = Field(None, description="environment variable holding the password (never logged)")
    ttl_s: int = Field(86400, ge=1, description="lifetime of a cached KV chunk")


class HerdConfig(_Frozen):
    model: str = Field(description="checkpoint directory (Hugging Face layout)")
    served_model_name: str | None = Field(None, description="the model id clients name (default: directory name)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the replica has a GPU")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    router: DeploymentOptions = Field(default_factory=DeploymentOptions)
    vision: VisionOptions = Field(default_factory=VisionOptions)
    ingress: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(num_cpus=0.5))
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    redis: RedisConfig | None = Field(None, description="the Redis server of the shared prefix cache")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    @classmethod
    def from_file(cls, path: str | Path) -> "HerdConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))
