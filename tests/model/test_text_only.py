"""A text-only (`llama4_text`) checkpoint has no `<|patch|>` token: the whole-sequence forward runs."""

import torch

from model.config import Llama4Config, TextConfig
from model.llama4 import Llama4


def test_text_only_logits():
    text = TextConfig(vocab_size=100, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      num_local_experts=2)
    cfg = Llama4Config.from_hf_dict(Llama4Config(text=text).to_hf_dict()["text_config"])  # model_type llama4_text
    assert cfg.image_token_index is None and cfg.vision is None
    model = Llama4(cfg)
    torch.manual_seed(0)
    for p in model.parameters():  # the module leaves its weights uninitialized (a checkpoint fills them)
        torch.nn.init.normal_(p, std=0.1)
    logits = model.logits([1, 2, 3])
    assert logits.shape == (3, 100) and torch.isfinite(logits).all()
