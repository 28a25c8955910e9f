"""Text logits equal transformers' Llama 4 on random tiny models (fp32, max abs diff <= 1e-4)."""

import pytest
import torch

import model
from tests.conftest import TINY_VOCAB, reference_logits

TOL = 1e-4
SEQ = 70  # > 8 chunks of 8 tokens and past floor_scale=4 many times over


def _compare(ref, ckpt, seq: int = SEQ, seed: int = 1) -> float:
    ids = torch.randint(0, TINY_VOCAB, (seq,), generator=torch.Generator().manual_seed(seed))
    ours = model.load(ckpt).logits(ids)
    theirs = reference_logits(ref, ids)
    assert ours.shape == theirs.shape == (seq, TINY_VOCAB)
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"max abs logit diff {diff:.3e} > {TOL}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    return diff


def test_scout_like(reference):
    """All MoE layers, QK norm, llama3 RoPE scaling, chunked attention + NoPE + temperature tuning."""
    _compare(*reference(moe_step=1, qk_norm=True, llama3_scaling=True))


@pytest.mark.parametrize("top_k", [1, 2])
def test_maverick_like(reference, top_k):
    """Dense and MoE layers interleaved, no QK norm, 8 experts, no RoPE scaling; top-k 1 and 2."""
    _compare(*reference(moe_step=2, num_experts=8, top_k=top_k, qk_norm=False, llama3_scaling=False))


def test_eight_layers_two_nope(reference):
    """Two NoPE layers (3 and 7) and a sequence much longer than the chunk."""
    _compare(*reference(num_layers=8, chunk=16, floor_scale=8), seq=150)


def test_chunking_matters(reference):
    """Guard against a vacuous pass: ignoring the chunk boundary must change the logits."""
    ref, ckpt = reference()
    m = model.load(ckpt)
    ids = torch.randint(0, TINY_VOCAB, (SEQ,), generator=torch.Generator().manual_seed(3))
    chunked = m.logits(ids)
    twin = model.Llama4(m.cfg.with_text(attention_chunk_size=None))
    twin.load_state_dict(m.state_dict())
    assert (twin.logits(ids) - chunked).abs().max() > 1e-2
