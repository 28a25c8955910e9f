"""The shipped example configs are complete `herd up --config` files that fit where they say."""

from pathlib import Path

from cluster.launcher import check_resources
from deployments.config import HerdConfig

ROOT = Path(__file__).resolve().parents[2]


def test_sharded_cpu_example_is_two_replicas_and_two_shards_over_the_collective_group():
    cfg = HerdConfig.from_file(ROOT / "cluster/examples/sharded-cpu.yaml")
    assert cfg.model == "checkpoints/small-scout"  # the demo checkpoint (Makefile DEMO_MODEL)
    assert cfg.model in (ROOT / "Makefile").read_text()
    assert (cfg.device, cfg.router_service.num_replicas) == ("cpu", 2)
    assert (cfg.experts.mode, cfg.experts.num_shards, cfg.experts.transport) == ("sharded", 2, "collective")
    check_resources(cfg, {"CPU": 8.0, "GPU": 0.0}, "a CPU machine (herd up offers at least 8 logical CPUs)")
