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


def test_real_rope_equals_the_complex_rotation(reference):
    """apply_rotary's cos/sin arithmetic is transformers' complex product, to fp32 precision."""
    from model.rope import apply_rotary, text_inv_freq, text_rope

    _, ckpt = reference(llama3_scaling=True)
    cfg = model.Llama4Config.from_dir(ckpt).text
    positions = torch.tensor([0, 1, 7, 4095, 8191, 100_000, 1_000_000])
    inv_freq = text_inv_freq(cfg)
    x = torch.randn(len(positions), 3, cfg.head_dim, generator=torch.Generator().manual_seed(4))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    rotation = torch.polar(torch.ones_like(freqs), freqs)[:, None, :]  # [T, 1, D/2] complex
    want = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation).flatten(-2)
    torch.testing.assert_close(apply_rotary(x, text_rope(inv_freq, positions)), want, rtol=1e-6, atol=1e-6)


def test_fused_qkv_keeps_the_checkpoint_names(reference):
    _, ckpt = reference()
    names = set(model.load(ckpt).state_dict())
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in names
    assert not any("qkv_proj" in n for n in names)
