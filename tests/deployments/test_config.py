"""The shipped Serve config is a valid Ray Serve config whose args are a valid HerdConfig, and
bad configs fail with the field named."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments.config import ExpertsConfig, HerdConfig

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_serve_config():
    config = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "cluster.app:build_app"
    cfg = HerdConfig.model_validate(app["args"])
    assert cfg.experts.mode == "sharded" and cfg.engine.max_num_seqs == 64


@pytest.mark.parametrize("args, field", [
    ({}, "model"),
    ({"model": "m", "experts": {"mode": "scattered"}}, "experts.mode"),
    ({"model": "m", "router_service": {"num_replicas": 0}}, "router_service.num_replicas"),
    ({"model": "m", "engine": {"block_size": "big"}}, "engine.block_size"),
    ({"model": "m", "colour": "blue"}, "colour"),
])
def test_bad_config_names_the_field(args, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        HerdConfig.model_validate(args)


def test_one_gpu_runs_the_experts_colocated():
    from deployments.config import ExpertsConfig
    from deployments.router_service import experts_are_sharded

    gpu_shards = ExpertsConfig(mode="sharded", num_shards=2, num_gpus_per_shard=1)
    assert not experts_are_sharded(gpu_shards, cluster_gpus=1)
    assert experts_are_sharded(gpu_shards, cluster_gpus=16)
    assert experts_are_sharded(ExpertsConfig(mode="sharded", num_shards=2), cluster_gpus=0)  # CPU shards
    assert not experts_are_sharded(ExpertsConfig(), cluster_gpus=16)  # colocated as configured


@pytest.mark.parametrize("experts, field", [
    ({"transport": "carrier-pigeon"}, "transport"),
    ({"micro_batches": 3}, "micro_batches"),
    ({"micro_batches": 0}, "micro_batches"),
    ({"group_timeout_s": 0}, "group_timeout_s"),
    ({"idle_poll_s": -1}, "idle_poll_s"),
])
def test_bad_expert_group_settings_name_their_field(experts, field):
    with pytest.raises(ValidationError, match=field):
        ExpertsConfig.model_validate({"mode": "sharded", **experts})


def test_expert_group_defaults():
    cfg = ExpertsConfig(mode="sharded")
    assert (cfg.transport, cfg.micro_batches, cfg.group_timeout_s) == ("collective", 1, 30.0)
