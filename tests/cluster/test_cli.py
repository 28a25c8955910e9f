"""`herd bench`: every benchmark in bench/ is reachable from the CLI with its own --help. The checks
`herd up` makes without Ray (tests/cluster/test_lifecycle.py runs the commands themselves)."""

import subprocess
import sys

import pytest

from cluster.cli import BENCHMARKS, main


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_herd_bench_runs_each_benchmark(name):
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", name, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert BENCHMARKS[name] in out.stdout  # the benchmark's own usage line


def test_herd_bench_rejects_an_unknown_benchmark(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "nope"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


SERVE_MESSAGE = """RouterService: A replica failed to start with exception. Retrying 2 more time(s). Error:
ray::ServeReplica:herd:RouterService.initialize_and_get_metadata() (pid=1, ip=10.0.0.1)
  File "replica.py", line 1928, in initialize
    raise RuntimeError(traceback.format_exc()) from None
RuntimeError: Traceback (most recent call last):
  File "model/checkpoint.py", line 190, in _read_state
    raise CheckpointError(f"{path}: tensor {name!r} is missing")
model.errors.CheckpointError: /ckpt: tensor 'norm.weight' is missing (expected shape [64])
"""


def test_a_failed_deployment_is_told_by_its_exception():
    from cluster.launcher import _exception_line

    expected = "CheckpointError: /ckpt: tensor 'norm.weight' is missing (expected shape [64])"
    assert _exception_line(SERVE_MESSAGE) == expected
    assert _exception_line("Deployment is unhealthy.\nmore") == "Deployment is unhealthy."


def test_resources_are_checked_before_ray():
    from cluster.launcher import ClusterError, check_resources, config_changes, resources_needed
    from deployments.config import HerdConfig

    cfg = HerdConfig.model_validate({"model": "/m", "router_service": {"num_replicas": 2, "num_gpus": 1},
                                     "experts": {"mode": "sharded", "num_shards": 4, "num_gpus_per_shard": 0.5,
                                                 "resources_per_shard": {"fast_nic": 1}}})
    assert resources_needed(cfg) == {"CPU": 1 * 2 + 1 + 0.5 + 4, "GPU": 2 + 2, "fast_nic": 4}
    check_resources(cfg, {"CPU": 8, "GPU": 4, "fast_nic": 4}, "here")
    with pytest.raises(ClusterError, match="needs 4 GPUs .* but here has 2"):
        check_resources(cfg, {"CPU": 8, "GPU": 2, "fast_nic": 4}, "here")
    with pytest.raises(ClusterError, match="fast_nic"):
        check_resources(cfg, {"CPU": 8, "GPU": 4}, "here")
    with pytest.raises(ClusterError, match="no GPU"):
        check_resources(HerdConfig(model="/m", device="cuda"), {"CPU": 8, "GPU": 0}, "here")
    assert config_changes({"model": "/a", "experts": {"mode": "colocated", "num_shards": 1}},
                          {"model": "/a", "experts": {"mode": "sharded", "num_shards": 1}}) == [
        "experts.mode: 'colocated' -> 'sharded'"]
