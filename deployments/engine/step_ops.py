"""Counting what one engine step runs, with torch.profiler on the CPU (for the structure tests and
bench/engine_bench.py).

`profile_step(engine)` runs `engine.step()` once and returns `StepOps`: the aten ops called from
Python (top level: an op not nested in another aten op), every aten op, the calls into compiled
code (`torch.compile` regions: the flex attention backend makes one per layer), and the torch
tensor methods Python called that read the device (`tolist`, `item`, ..., some without an aten op
on the CPU). Structure tests assert on these counts, and `bench/engine_bench.py` prints
them per decode step."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

GEMMS = ("aten::linear", "aten::matmul", "aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm")
SYNC_OPS = ("aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::bincount", "aten::unique")
SYNC_CALLS = ("tolist", "item", "nonzero", "bincount", "__bool__", "__int__", "__float__", "__index__", "numpy")


@dataclass(frozen=True)
class StepOps:
    top: Counter  # aten ops called from Python
    all: Counter  # every aten op, nested ones included
    calls: Counter  # SYNC_CALLS Tensor methods called from Python, by name
    compiled_regions: int = 0  # calls into torch.compile'd code ("Torch-Compiled Region" events)

    @property
    def attention_calls(self) -> int:
        """SDPA calls from Python plus compiled regions (each flex attention call is one; count
        only with backends whose compiled code is attention alone)."""
        return self.top["aten::scaled_dot_product_attention"] + self.compiled_regions

    @property
    def gemms(self) -> int:
        """Matrix multiplies called from Python (those inside another op, e.g. linear -> mm, not counted)."""
        return sum(self.top[name] for name in GEMMS)

    @property
    def syncs(self) -> dict[str, int]:
        """Ops and calls that make the host wait for the device (on a GPU), by name."""
        found = {name: self.top[name] for name in SYNC_OPS if self.top[name]}
        return found | {name: self.calls[name] for name in SYNC_CALLS if self.calls[name]}


@contextlib.contextmanager
def _counting_calls(calls: Counter) -> Iterator[None]:
    """Count the SYNC_CALLS Tensor methods Python calls, by patching them for the duration (not a
    TorchFunctionMode: dynamo traces an active mode into compiled regions and recompiles them for
    every change of its state, so the profiled step would count compilation)."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_CALLS if hasattr(torch.Tensor, name)}

    def counted(name: str, method: Callable) -> Callable:
        def call(self, *args, **kwargs):
            calls[name] += 1
            return method(self, *args, **kwargs)
        return call

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def profile_step(engine) -> StepOps:
    calls: Counter = Counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof, _counting_calls(calls):
        engine.step()
    top: Counter = Counter()
    every: Counter = Counter()
    regions = 0
    for event in prof.events():
        if event.name.startswith("Torch-Compiled Region"):
            regions += 1
        if not event.name.startswith("aten::"):
            continue
        every[event.name] += 1
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            top[event.name] += 1
    return StepOps(top, every, calls, regions)
