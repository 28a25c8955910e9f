"""serveConfigV2 against Ray's own ServeDeploySchema and the Herd application contract."""

import warnings

import pytest

with warnings.catch_warnings():  # Ray's own pydantic-v2 deprecation noise at import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from helm_chart import CASES, rayservice, serve_config

SERVICERS = ["deployments.pb.herd_pb2_grpc.add_HerdServicer_to_server",
             "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]


@pytest.mark.parametrize("case", CASES)
def test_serve_config_is_a_valid_ray_serve_config(renders, case):
    config = serve_config(renders[case])
    ServeDeploySchema.model_validate(config)
    # Serve ignores unknown keys; a misspelt key must fail here instead.
    (app,) = config["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    for deployment in app["deployments"]:
        assert set(deployment) <= set(DeploymentSchema.model_fields), deployment["name"]


@pytest.mark.parametrize("case", CASES)
def test_serve_config_follows_the_herd_contract(renders, case):
    config = serve_config(renders[case])
    assert config["proxy_location"] == "EveryNode"
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert config["grpc_options"] == {"port": 9000, "grpc_servicer_functions": SERVICERS}
    assert config["logging_config"] == {"encoding": "JSON", "log_level": "INFO"}
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("herd", "/", "cluster.app:build_app")
    args = app["args"]
    assert args["model"].startswith("/models/")
    assert args["redis"]["password_env"] == "REDIS_PASSWORD"
    # The args are exactly what cluster.app:build_app validates: a HerdConfig.
    from deployments.config import HerdConfig

    cfg = HerdConfig.model_validate(args)
    assert cfg.experts.mode == args["experts"]["mode"] and cfg.redis.url == args["redis"]["url"]
    assert [d["name"] for d in app["deployments"]] == ["Ingress", "VisionEncoder", "RouterService"]


def test_redis_url_follows_the_redis_choice(renders):
    assert serve_config(renders["default"])["applications"][0]["args"]["redis"]["url"] == \
        "redis://herd-redis:6379/0"
    external = serve_config(renders["external-redis"])["applications"][0]["args"]["redis"]
    assert external["url"] == "rediss://redis.example.internal:6380/0"


def test_single_gpu_profile_colocates_experts_on_one_gpu(renders):
    app = serve_config(renders["single-gpu"])["applications"][0]
    assert app["args"]["experts"]["mode"] == "colocated"
    assert app["args"]["experts"]["quantization"] == "int4"  # Scout fits one 80 GB GPU with int4 experts
    assert serve_config(renders["default"])["applications"][0]["args"]["experts"]["quantization"] == "none"
    deployments = {d["name"]: d for d in app["deployments"]}
    assert deployments["RouterService"]["num_replicas"] == 1
    gpus = sum(deployments[n]["ray_actor_options"]["num_gpus"] for n in ("RouterService", "VisionEncoder"))
    assert gpus <= _min_cluster_gpus(renders["single-gpu"]) == 1


def test_multinode_profile_spreads_shards_over_nodes(renders):
    app = serve_config(renders["multinode"])["applications"][0]
    experts = app["args"]["experts"]
    assert experts["mode"] == "sharded" and experts["placement_strategy"] == "SPREAD"
    router_service = {d["name"]: d for d in app["deployments"]}["RouterService"]
    assert router_service["autoscaling_config"]["min_replicas"] >= 2
    # the expert group: collective transport, two micro-batches, its NCCL/gloo interface on every Ray container
    assert (experts["transport"], experts["micro_batches"]) == ("collective", 2)
    cluster = rayservice(renders["multinode"])["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = {e["name"]: e.get("value") for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0"


def test_default_profile_uses_the_collective_expert_group(renders):
    from deployments.config import HerdConfig

    args = serve_config(renders["default"])["applications"][0]["args"]
    experts = HerdConfig.model_validate(args).experts
    assert (experts.mode, experts.transport, experts.micro_batches, experts.group_timeout_s) == \
        ("sharded", "collective", 1, 30)
    assert args["experts"]["cpu_group_backend"] == experts.cpu_group_backend == "socket"  # rendered, and accepted


@pytest.mark.parametrize("case", ["default", "single-gpu", "multinode"])
def test_profile_fits_its_minimum_cluster(renders, case):
    """Shards plus the minimum GPU replicas must fit on the minimum number of GPU nodes."""
    app = serve_config(renders[case])["applications"][0]
    experts = app["args"]["experts"]
    needed = experts["num_shards"] * experts["num_gpus_per_shard"] if experts["mode"] == "sharded" else 0
    for d in app["deployments"]:
        replicas = d.get("autoscaling_config", {}).get("min_replicas", d.get("num_replicas"))
        needed += replicas * d["ray_actor_options"].get("num_gpus", 0)
    assert needed <= _min_cluster_gpus(renders[case])


def _min_cluster_gpus(docs) -> int:
    groups = rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return sum(g["minReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                      ["nvidia.com/gpu"]) for g in groups)
