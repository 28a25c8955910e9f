"""bench/quant_gpu_check.py's CPU dry run: the script the GPU check calls runs end to end (tiny
shape, reference kernel) and its quantized formats match their own dequantized math."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "quant_gpu_check.py"


def test_dry_run_on_the_cpu(capsys):
    spec = importlib.util.spec_from_file_location("quant_gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--device", "cpu", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["bf16"], ["fp8"], ["int4"])]
    assert [(r[0], r[2]) for r in rows] == [(f, b) for b in ("1", "64") for f in ("bf16", "fp8", "int4")]
    assert all(float(r[3]) > 0 for r in rows)  # tokens/s
    assert "decode (smallest batch) speed-up vs bf16" in out and "ERROR" not in out
    assert "FP8 Linear (dense layers of Meta's FP8 checkpoints), batch 64: rel error" in out
