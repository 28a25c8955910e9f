"""Shared fixtures: tiny Llama 4 reference models built with transformers (the test reference
only) and synthetic checkpoints written by `herd synth`."""

from __future__ import annotations

import pytest
import torch

# Token ids the tiny reference configs use for the image markers (inside their vocabulary).
TINY_VOCAB = 512
BOI, EOI, PATCH, IMAGE, TILE_X, TILE_Y = 500, 501, 502, 503, 504, 505


def hf_tiny_config(
    *,
    moe_step: int = 1,
    num_experts: int = 4,
    top_k: int = 1,
    qk_norm: bool = True,
    llama3_scaling: bool = True,
    num_layers: int = 4,
    chunk: int = 8,
    floor_scale: int = 4,
    image_size: int = 56,
    patch_size: int = 14,
):
    """A transformers `Llama4Config` small enough to run in milliseconds on a CPU."""
    from transformers import Llama4Config

    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if llama3_scaling:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    text = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=48,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=num_experts, num_experts_per_tok=top_k, interleave_moe_layer_step=moe_step,
        use_qk_norm=qk_norm, attention_chunk_size=chunk, floor_scale=floor_scale, attn_scale=0.1,
        rope_parameters=rope, max_position_embeddings=4096, bos_token_id=1, eos_token_id=[2], pad_token_id=0,
    )
    vision = dict(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=patch_size, vision_output_dim=48, projector_input_dim=48, projector_output_dim=48,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return Llama4Config(text_config=text, vision_config=vision, boi_token_index=BOI, eoi_token_index=EOI,
                        image_token_index=PATCH)


def build_reference(tmp_path, seed: int = 0, **config):
    """Random-init a transformers Llama4ForConditionalGeneration, save it in the HF layout, and
    return (reference model, checkpoint dir)."""
    from transformers import Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = hf_tiny_config(**config)
    cfg._attn_implementation = "eager"
    ref = Llama4ForConditionalGeneration(cfg).eval()
    _rescale(ref, seed)
    ref.save_pretrained(tmp_path)
    return ref, tmp_path


def _rescale(ref, seed: int) -> None:
    """Replace transformers' std-0.02 init with O(1)-activation weights (the synth init), so that
    every part of the network moves the logits and a mismatch anywhere shows."""
    from model.synth import init_tensor

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            param.copy_(init_tensor(name, tuple(param.shape), gen, param.device))


@pytest.fixture
def reference(tmp_path):
    return lambda **config: build_reference(tmp_path, **config)


@torch.no_grad()
def reference_logits(ref, ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' logits `[T, vocab]`. `Llama4ForConditionalGeneration.forward` of transformers
    5.24 fails building its output object (no `image_outputs`), so this runs its parts in the order
    that forward does: embed, vision tower + projector into the `<|patch|>` rows, language model.
    The dev extra pins transformers below 5.24, and
    `tests/model/test_parity_images.py::test_image_logits_match_full_reference_forward` checks
    us against the whole forward too."""
    embeds = ref.get_input_embeddings()(ids[None])
    if pixel_values is not None:
        features = ref.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
        projected = ref.multi_modal_projector(features.view(-1, features.size(-1)))
        mask = (ids[None] == ref.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(mask, projected.to(embeds.dtype))
    return ref.language_model(inputs_embeds=embeds).logits[0].float()
