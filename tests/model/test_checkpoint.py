"""Checkpoint loading: single file, shards with an index, expert slices, and clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
from model.checkpoint import tensor_files
from tests.conftest import TINY_VOCAB

IDS = torch.arange(0, 40) * 7 % TINY_VOCAB
EXPERTS_KEY = "language_model.model.layers.{}.feed_forward.experts.{}"


def test_sharded_equals_single(reference, tmp_path_factory):
    ref, single = reference()
    sharded = tmp_path_factory.mktemp("sharded")
    ref.save_pretrained(sharded, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert torch.equal(model.load(single).logits(IDS), model.load(sharded).logits(IDS))


def test_expert_slice_loads_only_its_rows(reference):
    _, ckpt = reference(num_experts=4)
    full = model.load(ckpt)
    part = model.load(ckpt, experts=range(1, 3))
    for name in ("gate_up_proj", "down_proj"):
        ours = part.state_dict()[EXPERTS_KEY.format(0, name)]
        assert ours.shape[0] == 2
        assert torch.equal(ours, full.state_dict()[EXPERTS_KEY.format(0, name)][1:3])


def test_expert_slices_sum_to_all_experts(reference):
    """Two shards each run their half; their outputs add up to the full layer's routed output."""
    _, ckpt = reference(num_experts=4, top_k=2)
    layer = lambda m: m.language_model.model.layers[0].feed_forward  # noqa: E731
    full = layer(model.load(ckpt))
    halves = [layer(model.load(ckpt, experts=r)).experts for r in (range(0, 2), range(2, 4))]
    x = torch.randn(9, 64)
    ids, scores = full.router.route(x)
    total = sum(h(x, ids, scores) for h in halves)
    torch.testing.assert_close(total, full.experts(x, ids, scores), rtol=1e-5, atol=1e-5)


def test_bad_expert_range(reference):
    _, ckpt = reference(num_experts=4)
    with pytest.raises(model.CheckpointError, match="expert range"):
        model.load(ckpt, experts=range(2, 9))


def _rewrite(ckpt, edit):
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(reference):
    _, ckpt = reference()
    key = "language_model.model.layers.2.self_attn.k_proj.weight"
    _rewrite(ckpt, lambda t: t.pop(key))
    with pytest.raises(model.CheckpointError, match=r"layers\.2\.self_attn\.k_proj\.weight.*missing"):
        model.load(ckpt)


def test_misshaped_tensor_is_named(reference):
    _, ckpt = reference()
    key = EXPERTS_KEY.format(1, "down_proj")
    _rewrite(ckpt, lambda t: t.__setitem__(key, torch.zeros(4, 31, 64)))
    with pytest.raises(model.CheckpointError, match=r"layers\.1\.feed_forward\.experts\.down_proj.*\[4, 31, 64\]"):
        model.load(ckpt)


def test_no_weights_or_config(tmp_path):
    with pytest.raises(model.ConfigError, match="config.json"):
        model.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(model.ConfigError, match="not a Llama 4"):
        model.load(tmp_path)
    with pytest.raises(model.CheckpointError, match="no \\*.safetensors"):
        tensor_files(tmp_path)


@pytest.mark.parametrize("ids, message", [
    ([], "non-empty"),
    ([1, 2, TINY_VOCAB], f"token id {TINY_VOCAB} at position 2"),
    ([-1], "token id -1"),
    (torch.tensor([1.5]), "integers"),
    (torch.ones(2, 2, dtype=torch.long), "1D"),
])
def test_bad_token_ids(reference, ids, message):
    _, ckpt = reference()
    with pytest.raises(model.InvalidInputError, match=message):
        model.load(ckpt).logits(ids)


def test_patch_tokens_without_images(reference):
    from tests.conftest import PATCH

    _, ckpt = reference()
    with pytest.raises(model.InvalidInputError, match="2 <\\|patch\\|> tokens"):
        model.load(ckpt).logits([1, PATCH, PATCH, 5])


def test_expert_shard_and_vision_tower_load_alone(reference):
    from model.checkpoint import load_expert_shard, load_vision

    _, ckpt = reference(num_experts=4)
    full = model.load(ckpt)
    shard = load_expert_shard(ckpt, range(2, 4))
    assert sorted(shard) == [0, 1, 2, 3]
    assert torch.equal(shard[1].down_proj, full.state_dict()[EXPERTS_KEY.format(1, "down_proj")][2:4])
    tiles = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(load_vision(ckpt)(tiles), full.encode_images(tiles))
    router_only = model.load(ckpt, experts=range(0, 0))
    assert router_only.state_dict()[EXPERTS_KEY.format(0, "gate_up_proj")].shape[0] == 0
