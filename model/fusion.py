"""A boundary for inductor's fusion: `realize(x)` is `x`, computed once into its own buffer.

Inductor inlines pointwise producers into the loops of their consumers. Into a reduction that reads
each input element many times (the fused gather + multiply + sum forms of the compiled CPU decode
step: experts per row, `ring_decode`) that means recomputing the producer (a norm, a gate score, an
index) at every step of the inner loop, which made those loops 1.3-1.75x slower than the same loop
over a plain buffer (bench/RESULTS.md). An opaque custom op stops the inlining at the cost of one
copy of a small tensor (a decode batch's rows, a ring's slots).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("herd::realize", mutates_args=())
def realize(x: torch.Tensor) -> torch.Tensor:
    """A copy of `x`; under torch.compile, a buffer its consumers read instead of its producers' ops."""
    return x.clone()


@realize.register_fake
def _realize_shape(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
