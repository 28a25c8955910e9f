"""The expert-kernel seam: kernels are chosen by name, the reference kernel computes each expert's
SwiGLU on its run of rows, and `Experts` hands a kernel exactly its owned, gate-scaled rows."""

import pytest
import torch
import torch.nn.functional as F

from model.errors import ConfigError
from model.expert_kernel import EXPERT_KERNELS, expert_kernel, reference_kernel
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
    torch.testing.assert_close(seen["x"], torch.stack([x[1] * 0.25, x[2] * 0.75, x[0] * 0.5, x[2] * 1.0]))
    e2 = lambda v: swiglu(v, shard.gate_up_proj[0], shard.down_proj[0])  # noqa: E731
    e3 = lambda v: swiglu(v, shard.gate_up_proj[1], shard.down_proj[1])  # noqa: E731
    want = torch.stack([e3(x[0] * 0.5), e2(x[1] * 0.25), e2(x[2] * 0.75) + e3(x[2] * 1.0)])
    torch.testing.assert_close(out, want)
