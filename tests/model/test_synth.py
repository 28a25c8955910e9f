"""`herd synth` writes checkpoints in the real Hugging Face layout: transformers loads them and
computes the same logits as we do; the tokenizer and config agree on every special id."""

import json

import pytest
import torch

import model
from cluster.cli import main
from model.processor_config import ImageProcessorConfig
from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_scout(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-scout")
    assert main(["synth", "--preset", "tiny-scout", "--out", str(out), "--dtype", "float32",
                 "--max-shard-gib", str(0.5 / 1024)]) == 0
    return out


def test_layout(tiny_scout):
    files = {p.name for p in tiny_scout.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json", "preprocessor_config.json"} <= files
    assert sum(name.endswith(".safetensors") for name in files) > 1  # sharded by --max-shard-gib
    index = json.loads((tiny_scout / "model.safetensors.index.json").read_text())
    assert "language_model.model.layers.0.feed_forward.experts.gate_up_proj" in index["weight_map"]


def test_special_ids_come_from_the_tokenizer(tiny_scout):
    tok = Tokenizer.from_dir(tiny_scout)
    cfg = model.Llama4Config.from_dir(tiny_scout)
    assert cfg.image_token_index == tok.token_id("<|patch|>")
    assert cfg.boi_token_index == tok.token_id("<|image_start|>")
    assert cfg.eoi_token_index == tok.token_id("<|image_end|>")
    assert cfg.text.bos_token_id == tok.bos_id
    assert set(cfg.text.eos_token_id) == set(tok.stop_ids)
    assert cfg.text.vocab_size == tok.vocab_size


def test_transformers_reads_it_and_agrees(tiny_scout):
    from transformers import Llama4ForConditionalGeneration

    from tests.conftest import reference_logits

    ref = Llama4ForConditionalGeneration.from_pretrained(tiny_scout, attn_implementation="eager").eval()
    ours = model.load(tiny_scout)
    ids = torch.tensor(Tokenizer.from_dir(tiny_scout).encode("The quick brown fox " * 6, add_bos=True))
    diff = (ours.logits(ids) - reference_logits(ref, ids)).abs().max().item()
    assert diff <= 1e-4


def test_processor_config_matches_the_vision_tower(tiny_scout):
    """transformers reads the written preprocessor_config.json as the default Llama 4 processor with
    tiles of the tower's image_size, and so do we."""
    from transformers import AutoImageProcessor

    cfg = model.Llama4Config.from_dir(tiny_scout)
    hf = AutoImageProcessor.from_pretrained(tiny_scout)
    assert (hf.size.height, hf.size.width) == (cfg.vision.image_size, cfg.vision.image_size)
    assert (hf.max_patches, hf.resize_to_max_canvas, int(hf.resample)) == (16, False, 2)
    assert model.load(tiny_scout).image_processor.config == ImageProcessorConfig.default_for(cfg.vision)


def test_deterministic(tiny_scout, tmp_path):
    assert main(["synth", "--preset", "tiny-scout", "--out", str(tmp_path), "--dtype", "float32"]) == 0
    a, b = model.load(tiny_scout).state_dict(), model.load(tmp_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_num_layers_and_vocab_padding(tmp_path):
    assert main(["synth", "--preset", "tiny-maverick", "--out", str(tmp_path), "--num-layers", "2",
                 "--vocab-size", "4096"]) == 0
    cfg = model.Llama4Config.from_dir(tmp_path)
    assert cfg.text.num_hidden_layers == 2 and cfg.text.moe_layers == (1,) and cfg.text.vocab_size == 4096
    m = model.load(tmp_path, dtype=torch.bfloat16)
    assert m.logits([1, 2, 3]).shape == (3, 4096)


def test_unknown_preset_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["synth", "--preset", "nope", "--out", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err


def test_config_only_writes_no_weights_and_the_real_vocabulary(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"stale")  # another model's weights must not stay beside it
    assert main(["synth", "--preset", "maverick", "--config-only", "--out", str(tmp_path)]) == 0
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "preprocessor_config.json"} <= files
    assert not any(name.endswith(".safetensors") or name.endswith(".index.json") for name in files)
    cfg = model.Llama4Config.from_dir(tmp_path)
    assert cfg.text.vocab_size == 202048 and cfg.text.num_local_experts == 128
    assert Tokenizer.from_dir(tmp_path).vocab_size < cfg.text.vocab_size  # padded, as the released checkpoint is
