"""`herd bench`: every benchmark in bench/ is reachable from the CLI with its own --help."""

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
