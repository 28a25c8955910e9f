"""Engine test fixtures: synthetic tiny checkpoints (`herd synth`, with their tokenizer), short
attention chunks so that chunking shows in short prompts, and transformers' greedy `generate` on
the same checkpoint as the reference."""

import json

import pytest
import torch

from model.synth import synthesize


def make_checkpoint(tmp_path_factory, preset: str, chunk: int = 8, floor_scale: int = 4, top_k: int | None = None):
    """Synthesize `preset` in fp32, shorten its attention chunk (and set its experts per token),
    and load the transformers reference."""
    from transformers import Llama4ForConditionalGeneration

    path = tmp_path_factory.mktemp(preset)
    synthesize(path, preset, seed=5, dtype=torch.float32, progress=False)
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(attention_chunk_size=chunk, floor_scale=floor_scale)
    if top_k is not None:
        config["text_config"]["num_experts_per_tok"] = top_k
    (path / "config.json").write_text(json.dumps(config))
    ref = Llama4ForConditionalGeneration.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return ref.eval(), path


@pytest.fixture(scope="module")
def scout_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory, "tiny-scout")


@pytest.fixture(scope="module")
def maverick_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory, "tiny-maverick", top_k=2)  # Maverick is top-1; top-2 exercises the sum


@torch.no_grad()
def hf_greedy(ref, ids: list[int], max_new_tokens: int, pixel_values: torch.Tensor | None = None) -> list[int]:
    """transformers' greedy `generate` (its own KV cache), run through the language model on the
    merged text + image embeddings (the top-level forward is broken in transformers 5.24)."""
    ids_t = torch.tensor(ids)[None]
    embeds = ref.get_input_embeddings()(ids_t)
    if pixel_values is not None:
        features = ref.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
        projected = ref.multi_modal_projector(features.view(-1, features.size(-1)))
        mask = (ids_t == ref.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(mask, projected.to(embeds.dtype))
    out = ref.language_model.generate(
        inputs_embeds=embeds, attention_mask=torch.ones_like(ids_t), max_new_tokens=max_new_tokens,
        min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0,
    )
    return out[0, -max_new_tokens:].tolist()
