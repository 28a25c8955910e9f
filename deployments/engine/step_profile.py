"""What one engine step launches, counted with `torch.profiler`: every aten op, the attention
calls, the expert GEMMs and the ops that make the host wait for the device (a sync on CUDA).
Used by `bench/engine_bench.py` (ops per step) and the structure test of the fast path."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from deployments.engine.engine import Engine

ATTENTION_OPS = frozenset({
    "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "flex_attention", "aten::_flash_attention_forward", "aten::_efficient_attention_forward",
})
# Ops that copy a device value to the host (on CUDA each waits for the stream).
SYNC_OPS = frozenset({"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::bincount",
                      "aten::unique", "aten::_unique2", "aten::masked_select", "aten::repeat_interleave"})
GROUPED_GEMM_OPS = frozenset({"aten::_grouped_mm", "aten::grouped_mm"})


@dataclass(frozen=True)
class StepProfile:
    ops: Counter[str]  # every op event the profiler saw (aten ops and recorded functions), by name
    num_aten_ops: int  # events named aten::* (nested ones included, as the profiler records them)

    def count(self, names: frozenset[str]) -> int:
        return sum(n for name, n in self.ops.items() if name in names)

    @property
    def attention_calls(self) -> int:
        """Top-level attention calls (an SDPA call counts once, not with the kernel it dispatches to)."""
        sdpa = self.ops.get("aten::scaled_dot_product_attention", 0)
        return sdpa or self.count(ATTENTION_OPS)

    @property
    def sync_ops(self) -> int:
        return self.count(SYNC_OPS)


def profile_step(engine: Engine) -> tuple[StepProfile, int]:
    """Run one `engine.step()` under the profiler; returns its profile and how many requests it advanced."""
    activities = [ProfilerActivity.CPU]
    with profile(activities=activities, record_shapes=False) as prof:
        outputs = engine.step()
        if engine.model.device.type == "cuda":
            torch.cuda.synchronize()
    ops = Counter(e.name for e in prof.events())
    return StepProfile(ops, sum(n for name, n in ops.items() if name.startswith("aten::"))), len(outputs)


def prefill_all(engine: Engine) -> None:
    """Step until every added request has its first token (the batch is then decode-only)."""
    while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
        engine.step()
