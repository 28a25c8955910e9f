"""`make gpu-check`'s CPU dry run (`bench/gpu_check.py --device cpu --tiny`): every section runs on
a tiny model and writes its JSON and bench/RESULTS.md row, so the command is ready for a GPU."""

import json

from bench.gpu_check import SECTIONS, main, weights_touched
from model.presets import SpecialIds, preset


def test_dry_run_on_the_cpu(tmp_path):
    rc = main(["--device", "cpu", "--tiny", "--batches", "1", "2", "--new-tokens", "3", "--prompt-len", "16",
               "--prefill-len", "32", "--parity-tokens", "4", "--kv-cache-mb", "32", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(SECTIONS) == ["parity", "decode", "prefill", "transformers", "quantized_experts"]
    for name in ("tiny-scout", "tiny-maverick"):
        parity = result["parity"][name]
        assert parity["fast_fp32_tokens_equal_reference"] and parity["fast_fp32_tokens_equal_transformers"]
        assert parity["max_logprob_diff_fp32"] < 1e-4
        assert 0.0 <= parity["bf16_greedy_agreement"] <= 1.0
    assert result["decode"]["1"]["tokens_per_s"] > 0 and result["decode"]["2"]["weight_bytes_per_step"] > 0
    assert result["prefill"]["tokens"] == 32 and result["prefill"]["tflops"] > 0
    assert result["transformers"]["decode_tokens_per_s_batch1"] > 0
    formats = {(r["format"], r["batch"]) for r in result["quantized_experts"]["rows"]}
    assert formats == {(f, b) for f in ("bf16", "fp8", "int4") for b in (1, 2)}
    row = (tmp_path / "gpu_check_row.md").read_text()
    assert "| decode batch 1 |" in row and "| transformers generate, batch 1 |" in row


def test_weights_touched_counts_the_experts_hit():
    ids = SpecialIds(vocab_size=202048, bos=1, stop=(2,), pad=0, image_start=3, image_end=4, patch=5)
    text = preset("scout", ids, num_layers=4).text
    one, many = weights_touched(text, 1, 2), weights_touched(text, 64, 2)
    expert = 3 * 5120 * 8192 * 2  # bytes of one routed expert
    # batch 1: one routed expert per layer; batch 64: nearly all 16 (1 - (15/16)^64 = 98.4%)
    expected = 4 * expert * 16 * ((1 - (15 / 16) ** 64) - 1 / 16)
    assert abs((many - one) - expected) < 0.01 * expert
