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
    assert cfg.auth.enabled and cfg.auth.keys_file == "~/.cache/herd/keys.json"  # herd up's key store


@pytest.mark.parametrize("args, field", [
    ({}, "model"),
    ({"model": "m", "experts": {"mode": "scattered"}}, "experts.mode"),
    ({"model": "m", "router_service": {"num_replicas": 0}}, "router_service.num_replicas"),
    ({"model": "m", "engine": {"block_size": "big"}}, "engine.block_size"),
    ({"model": "m", "colour": "blue"}, "colour"),
    ({"model": "m", "engine": {"expert_kernel": "grouped-typo"}}, "engine.expert_kernel"),
    ({"model": "m", "experts": {"kernel": "grouped"}}, "experts.kernel"),  # moved to engine.expert_kernel
])
def test_bad_config_names_the_field(args, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        HerdConfig.model_validate(args)


def test_expert_kernel_is_an_engine_key_and_auto_picks_by_device():
    from model.expert_kernel import resolve_expert_kernel

    cfg = HerdConfig.model_validate({"model": "m", "engine": {"expert_kernel": "grouped"}})
    assert cfg.engine.expert_kernel == "grouped"
    assert HerdConfig.model_validate({"model": "m"}).engine.expert_kernel == "auto"
    assert resolve_expert_kernel("auto", "cuda") == "grouped"
    assert resolve_expert_kernel("auto", "cpu") == "reference"
    assert resolve_expert_kernel("grouped", "cpu") == "grouped"


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


def test_back_pressure_is_consistent_and_reachable():
    """The engine's max_waiting must be below the router service's max_ongoing_requests (else its
    fast refusal never happens); Serve queues are bounded by default and refuse with 429."""
    from deployments.engine.validation import describe_validation_error

    with pytest.raises(ValidationError) as info:
        HerdConfig.model_validate({"model": "m", "engine": {"max_waiting": 4096}})
    message = describe_validation_error(info.value)
    assert "engine.max_waiting (4096)" in message and "router_service.max_ongoing_requests (256)" in message
    with pytest.raises(ValidationError, match="max_queued_requests"):
        HerdConfig.model_validate({"model": "m", "ingress": {"max_queued_requests": 0}})
    cfg = HerdConfig.model_validate({"model": "m"})
    assert cfg.engine.max_waiting < cfg.router_service.max_ongoing_requests
    from cluster.app import _options

    for opts in (cfg.ingress, cfg.router_service, cfg.vision):
        options = _options(opts)
        assert options["max_queued_requests"] == 64 and options["backpressure_config"].status_code == 429


def test_served_engines_default_to_a_reachable_max_waiting():
    from deployments.config import SERVING_MAX_WAITING
    from deployments.engine.config import EngineConfig

    assert HerdConfig.model_validate({"model": "m"}).engine.max_waiting == SERVING_MAX_WAITING
    assert HerdConfig.model_validate({"model": "m", "engine": {"max_num_seqs": 8}}).engine.max_waiting == 128
    assert HerdConfig.model_validate({"model": "m", "engine": {"max_waiting": 7}}).engine.max_waiting == 7
    assert EngineConfig().max_waiting == 4096  # offline batches (Engine.generate, benchmarks) are not capped


def test_expert_quantization_is_checked_and_names_the_served_precision(tmp_path):
    """experts.quantization: none | fp8 | int4; served_precision is what /v1/models and ListModels say."""
    import json

    from deployments.openai_api import models_list
    from model.errors import ConfigError

    with pytest.raises(ValidationError, match=r"experts\.quantization[\s\S]*unknown expert quantization 'int8'"):
        HerdConfig.model_validate({"model": "m", "experts": {"quantization": "int8"}})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4"}))
    cpu = HerdConfig.model_validate({"model": str(tmp_path)})
    assert cpu.served_precision() == {"weights": "fp32", "experts": "fp32"}
    gpu_int4 = HerdConfig.model_validate({"model": str(tmp_path), "router_service": {"num_gpus": 1},
                                          "experts": {"quantization": "int4"}})
    assert gpu_int4.served_precision() == {"weights": "bf16", "experts": "int4"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4",
                                                      "quantization_config": {"quant_method": "fbgemm_fp8"}}))
    assert HerdConfig.model_validate({"model": str(tmp_path), "device": "cuda"}).served_precision() == \
        {"weights": "bf16", "experts": "fp8"}  # Meta's FP8 checkpoint is served in FP8
    with pytest.raises(ConfigError, match="served in FP8"):
        gpu_int4.served_precision()
    body = models_list(["m"], created=1, precision={"weights": "bf16", "experts": "fp8"})
    assert body["data"][0]["precision"] == {"weights": "bf16", "experts": "fp8"} and body["data"][0]["id"] == "m"
