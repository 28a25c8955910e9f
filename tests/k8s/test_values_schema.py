"""Bad values fail at install time: values.schema.json, then the chart's cross-field checks."""

import json

import jsonschema
import pytest
from helm_chart import CHART_DIR, template

SCHEMA_ERROR = "values don't meet the specifications of the schema"

WORKER = '{"name": "h100x8", "replicas": 1, "minReplicas": 1, "maxReplicas": 2}'

# name -> (helm arguments, where the schema error must point)
BAD_VALUES = {
    "negative router service replicas": (["--set", "routerService.replicas=-1"], "/routerService/replicas"),
    "negative worker replicas": (
        ["--set-json", "gpuWorkers=[" + WORKER.replace('"replicas": 1', '"replicas": -1') + "]"],
        "/gpuWorkers/0/replicas",
    ),
    "unknown experts mode": (["--set", "experts.mode=everywhere"], "/experts/mode"),
    "missing model path": (["--set", "model.path=null"], "missing property 'path'"),
    "relative model path": (["--set", "model.path=models/scout"], "/model/path"),
    "gpu count as string": (["--set-string", "gpuWorkerDefaults.gpus=8"], "/gpuWorkerDefaults/gpus"),
    "worker gpu count as string": (["--set-json", "gpuWorkers=[" + WORKER[:-1] + ', "gpus": "8"}]'],
                                   "/gpuWorkers/0/gpus"),
    "fractional gpu count": (["--set", "gpuWorkerDefaults.gpus=0.5"], "/gpuWorkerDefaults/gpus"),
    "unknown top-level key": (["--set", "routers.replicas=2"], "'routers' not allowed"),
    # values written before the rename to routerService must fail, not be silently ignored
    "old router key": (["--set", "router.replicas=2"], "'router' not allowed"),
    "secret in runtime env": (["--set", "serve.envVars.HF_TOKEN=hf_abc"], "HF_TOKEN"),
    "credentials in redis url": (["--set", "redis.deploy=false",
                                  "--set", "redis.external.url=redis://user:pw@redis:6379/0"],
                                 "/redis/external/url"),
    "password query in redis url": (["--set", "redis.deploy=false", "--set", "redis.auth.existingSecret=s",
                                     "--set", "redis.external.url=redis://redis:6379?password=pw"],
                                    "/redis/external/url"),
    "external redis without url": (["--set", "redis.deploy=false"], "/redis/external/url"),
    "network peer with a typo": (["--set", "networkPolicy.clients[0].podSelecter.matchLabels.app=x"],
                                 "/networkPolicy/clients/0"),
    "empty network peer": (["--set-json", "networkPolicy.clients=[{}]"], "/networkPolicy/clients/0"),
    "ray auth as a string": (["--set-string", "rayAuth.enabled=yes"], "/rayAuth/enabled"),
    "colocated with shards": (["--set", "experts.mode=colocated", "--set", "experts.numShards=4"],
                              "/experts/numShards"),
    "pvc without claim": (["--set", "model.source=pvc"], "/model/pvc/claimName"),
    "bad placement strategy": (["--set", "experts.placementStrategy=RANDOM"], "/experts/placementStrategy"),
    "unknown experts transport": (["--set", "experts.transport=carrier-pigeon"], "/experts/transport"),
    "three micro-batches": (["--set", "experts.microBatches=3"], "/experts/microBatches"),
    "zero group timeout": (["--set", "experts.groupTimeoutSeconds=0"], "/experts/groupTimeoutSeconds"),
    "non-collective env in collectiveEnv": (["--set", "experts.collectiveEnv.HF_TOKEN=x"], "HF_TOKEN"),
    "non-string rayStartParams": (["--set", "head.rayStartParams.num-gpus=0"], "/head/rayStartParams/num-gpus"),
    "container without limits": (["--set", "redis.resources.limits=null"], "/redis/resources"),
}

BAD_COMBINATIONS = {
    "replicas above max": (["--set-json", "gpuWorkers=[" + WORKER.replace('"replicas": 1', '"replicas": 5') + "]"],
                           "minReplicas <= replicas <= maxReplicas"),
    "model outside its volume": (["--set", "model.path=/opt/scout"], "must lie under model.mountPath"),
    "both monitors": (["--set", "monitoring.podMonitor.enabled=true",
                       "--set", "monitoring.serviceMonitor.enabled=true"], "not both"),
    "monitoring behind the network policy": (["--set", "monitoring.podMonitor.enabled=true"],
                                             "networkPolicy.metricsFrom"),
    "external redis auth without secret": (["--set", "redis.deploy=false",
                                            "--set", "redis.external.url=redis://r:6379/0"],
                                           "redis.auth.existingSecret"),
    "autoscaling min above max": (["--set", "routerService.autoscaling.enabled=true",
                                   "--set", "routerService.autoscaling.minReplicas=9"],
                                  "routerService.autoscaling: minReplicas > maxReplicas"),
}


def test_schema_is_valid_json_schema():
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)


@pytest.mark.parametrize("name", BAD_VALUES)
def test_schema_rejects(helm, name):
    args, where = BAD_VALUES[name]
    result = template(*args)
    assert result.returncode != 0, f"{name}: accepted"
    assert SCHEMA_ERROR in result.stderr and where in result.stderr, result.stderr


@pytest.mark.parametrize("name", BAD_COMBINATIONS)
def test_chart_rejects(helm, name):
    args, message = BAD_COMBINATIONS[name]
    result = template(*args)
    assert result.returncode != 0, f"{name}: accepted"
    assert message in result.stderr, result.stderr
