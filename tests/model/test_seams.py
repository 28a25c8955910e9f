"""The expert-kernel seam: kernels are chosen by name, the reference kernel computes each expert's
SwiGLU on its run of rows, `Experts` hands a kernel its owned, gate-scaled rows sorted by expert
(then the pairs it does not own as zero padding: static shapes), and the `grouped` kernel equals
the reference exactly in fp32."""

import pytest
import torch
import torch.nn.functional as F

from model.errors import ConfigError
from model.expert_kernel import EXPERT_KERNELS, expert_kernel, grouped_kernel, reference_kernel
from model.moe import Experts


def swiglu(x, gate_up, down):
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


def test_unknown_kernel_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown expert kernel 'grouped-typo'.*reference"):
        expert_kernel("grouped-typo")
    with pytest.raises(ConfigError):
        Experts(8, 4, 2, kernel="nope")
    assert expert_kernel("reference") is reference_kernel is EXPERT_KERNELS["reference"]


def test_reference_kernel_runs_each_expert_on_its_rows():
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(3, 8, 10, generator=g), torch.randn(3, 5, 8, generator=g)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 8, generator=g)
    out = reference_kernel(x, counts, gate_up, down)
    want = torch.cat([swiglu(x[:2], gate_up[0], down[0]), swiglu(x[2:], gate_up[2], down[2])])
    torch.testing.assert_close(out, want)
    assert reference_kernel(x[:0], torch.zeros(3, dtype=torch.long), gate_up, down).shape == (0, 8)
    padded = reference_kernel(x, torch.tensor([2, 0, 1]), gate_up, down)  # rows 3, 4: padding, output zero
    torch.testing.assert_close(padded[:3], torch.cat([swiglu(x[:2], gate_up[0], down[0]),
                                                      swiglu(x[2:3], gate_up[2], down[2])]))
    assert not padded[3:].any()


def test_experts_give_a_kernel_only_owned_scaled_rows_sorted_by_expert():
    seen = {}

    def spy(x, counts, gate_up, down):
        seen.update(x=x.clone(), counts=counts.clone())
        return reference_kernel(x, counts, gate_up, down)

    EXPERT_KERNELS["spy"] = spy
    try:
        shard = Experts(4, 3, num_experts=2, first_expert=2, kernel="spy")  # owns experts 2 and 3
    finally:
        del EXPERT_KERNELS["spy"]
    torch.nn.init.normal_(shard.gate_up_proj)
    torch.nn.init.normal_(shard.down_proj)
    x = torch.arange(12.0).view(3, 4)
    ids = torch.tensor([[3, 0], [1, 2], [2, 3]])  # top-2; experts 0 and 1 live on another shard
    scores = torch.tensor([[0.5, 0.9], [0.1, 0.25], [0.75, 1.0]])
    out = shard(x, ids, scores)
    assert seen["counts"].tolist() == [2, 2]  # expert 2: tokens 1, 2; expert 3: tokens 0, 2
    owned = torch.stack([x[1] * 0.25, x[2] * 0.75, x[0] * 0.5, x[2] * 1.0])
    torch.testing.assert_close(seen["x"], torch.cat([owned, torch.zeros(2, 4)]))  # 6 = T * k rows, 2 padding
    e2 = lambda v: swiglu(v, shard.gate_up_proj[0], shard.down_proj[0])  # noqa: E731
    e3 = lambda v: swiglu(v, shard.gate_up_proj[1], shard.down_proj[1])  # noqa: E731
    want = torch.stack([e3(x[0] * 0.5), e2(x[1] * 0.25), e2(x[2] * 0.75) + e3(x[2] * 1.0)])
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("seed", range(4))
def test_grouped_kernel_equals_reference_exactly(seed):
    """Random counts (some experts empty, padding rows after them): bitwise equal in fp32 eager."""
    g = torch.Generator().manual_seed(seed)
    experts, hidden, inter = 6, 16, 8
    gate_up = torch.randn(experts, hidden, 2 * inter, generator=g)
    down = torch.randn(experts, inter, hidden, generator=g)
    counts = torch.randint(0, 4, (experts,), generator=g) * (torch.rand(experts, generator=g) < 0.6)
    counts[seed % experts] = 0  # at least one empty expert
    padding = seed  # seed 0: none
    x = torch.randn(int(counts.sum()) + padding, hidden, generator=g)
    want = reference_kernel(x, counts, gate_up, down)
    got = grouped_kernel(x, counts, gate_up, down)
    owned = int(counts.sum())
    assert torch.equal(got[:owned], want[:owned])
    assert expert_kernel("grouped") is grouped_kernel


def test_per_row_form_equals_reference_eager_and_compiled():
    """The form compiled CPU decode steps take (`_per_row`, gather + multiply + sum, fused by
    inductor): the reference's rows within fp32 rounding (another order of the sums), eager and
    compiled, with empty experts and padding rows; compiled, `grouped_kernel` takes it up to
    `PER_ROW_MAX_ROWS` rows."""
    from model import expert_kernel as ek

    g = torch.Generator().manual_seed(7)
    experts, hidden, inter = 6, 32, 16
    gate_up = torch.randn(experts, hidden, 2 * inter, generator=g)
    down = torch.randn(experts, inter, hidden, generator=g)
    counts = torch.tensor([3, 0, 1, 4, 0, 2])
    x = torch.randn(int(counts.sum()) + 3, hidden, generator=g)  # 3 padding rows
    want = reference_kernel(x, counts, gate_up, down)[:10]
    torch.testing.assert_close(ek._per_row(x, counts, gate_up, down)[:10], want, atol=1e-4, rtol=1e-5)
    compiled = torch.compile(grouped_kernel, dynamic=False, fullgraph=True)
    assert x.shape[0] <= ek.PER_ROW_MAX_ROWS
    torch.testing.assert_close(compiled(x, counts, gate_up, down)[:10], want, atol=1e-4, rtol=1e-5)
    # the weights stored column-major per expert (as Engine stores them for compiled CPU steps)
    gate_up_cm, down_cm = ek.column_major(gate_up), ek.column_major(down)
    assert torch.equal(gate_up_cm, gate_up) and gate_up_cm.stride() == (hidden * 2 * inter, 1, hidden)
    torch.testing.assert_close(compiled(x, counts, gate_up_cm, down_cm)[:10], want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grouped_kernel(x, counts, gate_up_cm, down_cm)[:10], want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shard", [range(0, 8), range(0, 3), range(3, 8), range(5, 6)])
def test_experts_forward_grouped_equals_reference(top_k, shard):
    """The whole `Experts` layer, all experts or a shard's slice, over random routing (tokens whose
    choices all live on other shards included); `forward_rows` (a CPU shard's few-row path) too."""
    g = torch.Generator().manual_seed(top_k * 10 + shard.start)
    hidden, inter, tokens = 16, 8, 13
    layers = {name: Experts(hidden, inter, len(shard), shard.start, kernel=name) for name in ("reference", "grouped")}
    weights = {"gate_up_proj": torch.randn(len(shard), hidden, 2 * inter, generator=g),
               "down_proj": torch.randn(len(shard), inter, hidden, generator=g)}
    for layer in layers.values():
        layer.load_state_dict(weights)
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:top_k] for _ in range(tokens)])  # [T, k] global ids
    scores = torch.rand(tokens, top_k, generator=g)
    want, got = layers["reference"](x, ids, scores), layers["grouped"](x, ids, scores)
    assert torch.equal(got, want)
    torch.testing.assert_close(layers["reference"].forward_rows(x, ids, scores), want, atol=1e-5, rtol=1e-5)
    assert layers["reference"].forward_rows(x[:0], ids[:0], scores[:0]).shape == (0, hidden)
    not_owned = ~((ids >= shard.start) & (ids < shard.stop)).any(dim=1)
    assert not want[not_owned].any()  # tokens with no owned choice get exactly zero


@pytest.mark.parametrize("mode", ["fp8", "int4"])
def test_forward_rows_equals_forward_on_quantized_experts(mode):
    """A CPU shard's few-row path runs quantized experts with the reference math of `forward`."""
    from model.quantization import quantize_experts

    g = torch.Generator().manual_seed(7)
    hidden, inter, shard = 32, 16, range(2, 6)
    layer = Experts(hidden, inter, len(shard), shard.start, kernel="reference")
    layer.set_weights(quantize_experts(torch.randn(len(shard), hidden, 2 * inter, generator=g), mode),
                      quantize_experts(torch.randn(len(shard), inter, hidden, generator=g), mode))
    x = torch.randn(3, hidden, generator=g)
    ids, scores = torch.tensor([[2], [5], [0]]), torch.rand(3, 1, generator=g)  # the last row is another shard's
    want = layer(x, ids, scores)
    torch.testing.assert_close(layer.forward_rows(x, ids, scores), want, atol=1e-5, rtol=1e-5)
    assert want[:2].abs().sum() > 0 and not want[2].any()
