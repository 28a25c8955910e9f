"""Compiling the engine step: `torch.compile` of the decoder block, and on CUDA the decode step
captured as CUDA graphs per padded batch size (`EngineConfig.compile` / `cuda_graphs`).

Two ways, chosen by what the backends allow:

- **Whole step** (`StepCompiler.step_traceable`): when the attention backend and the routed
  experts both trace (no host syncs, no Python branching on data: `flex` attention, `grouped`
  experts; in fp32, where `_grouped_mm` has no meta kernel, as the custom op
  `herd::grouped_experts`, opaque to inductor but no graph break), the runner's
  whole forward (embeddings to final hidden states) is one compiled graph. Decode-only batches
  are padded to a bucket (1, 2, 4, ... max_num_seqs) with dummy one-token sequences that write
  into a scratch KV block, so each bucket compiles once; with `cuda_graphs` each bucket is
  compiled with `mode="reduce-overhead"` (CUDA graph trees: one graph replay per step). Prefill
  and mixed batches are padded to a few token-count buckets and compiled without graphs; on the
  CPU, where flex gathers prefill windows for one SDPA (`FlexBackend.gather_prefill`), they run
  eager and unpadded instead (faster there than compiled flex). (An
  opaque call inside the layer loop makes dynamo drop the whole frame to eager and compile each
  layer's pieces apart: far slower on the CPU, so a step either traces whole or goes per block.)
- **Per block** otherwise (the reference backends: per-sequence loops, `.tolist()`): each
  decoder block is compiled with the attention and routed-expert calls
  left opaque (`torch.compiler.disable`; flex attention is compiled on its own), so the norms,
  projections, RoPE, router and shared expert fuse around them; shapes dynamic, so one compile
  per kind of layer, whatever the batch.

Compile time is bounded: the recompile limit is raised to the number of buckets, nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from deployments.engine.kv_manager import KVManager
from deployments.engine.scheduler import ScheduledChunk
from deployments.engine.sequence import Sequence
from model.text import Attend

PREFILL_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Padded decode batch sizes: powers of two up to `max_num_seqs`, and `max_num_seqs` itself."""
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return (*sizes, max_num_seqs)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding `n` (None when `n` exceeds them all: run unpadded)."""
    return next((b for b in buckets if b >= n), None)


@dataclass(frozen=True)
class CompileSettings:
    """What `EngineConfig.compile` / `cuda_graphs` resolve to on a device."""

    compile: bool
    cuda_graphs: bool
    backend: str = "inductor"  # "eager" / "aot_eager" in tests: dynamo's tracing without codegen

    @classmethod
    def resolve(cls, compile: bool | None, cuda_graphs: bool | None, device: torch.device,
                backend: str = "inductor") -> CompileSettings:
        """None means: on for CUDA, off elsewhere. CUDA graphs need CUDA and compile."""
        on_cuda = device.type == "cuda"
        do_compile = on_cuda if compile is None else compile
        graphs = (on_cuda and do_compile) if cuda_graphs is None else cuda_graphs
        if graphs and not on_cuda:
            raise ValueError("cuda_graphs needs a CUDA device")
        if graphs and not do_compile:
            raise ValueError("cuda_graphs needs compile")
        return cls(do_compile, graphs, backend)


def opaque(fn: Callable) -> Callable:
    """`fn` called eagerly from compiled code (a graph break, never traced)."""
    return torch.compiler.disable(fn, recursive=True)


TRACEABLE_ATTENTION = frozenset({"flex"})


def experts_trace(kernel: str, dtype: torch.dtype) -> bool:
    """Whether the routed experts can be inside a compiled graph: the grouped kernel (in 16 bits
    `_grouped_mm` traces; in other dtypes it is the opaque custom op `herd::grouped_experts`)."""
    del dtype  # any: see model/expert_kernel.grouped_kernel
    return kernel == "grouped"


def _block(layer: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor, freqs_cis: torch.Tensor, attend: Attend,
           routed: Callable) -> torch.Tensor:
    return layer(x, positions, freqs_cis, attend, routed)


class StepCompiler:
    """Holds the compiled callables and the padding of one engine (see the module docstring)."""

    def __init__(self, settings: CompileSettings, kv: KVManager, max_num_seqs: int, *, attention_traceable: bool,
                 experts_traceable: bool):
        self.settings = settings
        self.kv = kv
        self.step_traceable = attention_traceable and experts_traceable
        self.decode_buckets = decode_buckets(max_num_seqs)
        backend = settings.backend
        if self.step_traceable:
            # one scratch block per KV group, taken while the pools are still empty, for the padding
            self._scratch = {name: pool.allocate() for name, pool in kv.pools.items()}
            limit = len(self.decode_buckets) + len(PREFILL_BUCKETS) + 2
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
            mode = "reduce-overhead" if settings.cuda_graphs else None
            self._decode_compile = lambda fn: torch.compile(fn, backend=backend, mode=mode, dynamic=False)
            self._prefill_compile = lambda fn: torch.compile(fn, backend=backend, dynamic=False)
        else:
            self.block = torch.compile(_block, backend=backend, dynamic=True)

    # ---- the whole step -------------------------------------------------------------------
    def compile_step(self, forward: Callable) -> tuple[Callable, Callable]:
        """(decode, prefill) compiled versions of `forward`, each with its own compile cache."""

        def decode(*args):
            return forward(*args)

        def prefill(*args):
            return forward(*args)

        return self._decode_compile(decode), self._prefill_compile(prefill)

    def pad(self, chunks: list[ScheduledChunk], pad_prefill: bool = True) -> tuple[list[ScheduledChunk], bool]:
        """`chunks` padded to a bucket with dummy chunks (after the real ones; they never sample),
        and whether the batch is decode-only. Unpadded when no bucket holds it, and batches with
        prefill unpadded unless `pad_prefill` (they run eager)."""
        decode_only = all(c.num_tokens == 1 for c in chunks)
        if decode_only:
            size = bucket_for(len(chunks), self.decode_buckets)
            if size is None or size == len(chunks):
                return chunks, True
            return chunks + [self._dummy(1) for _ in range(size - len(chunks))], True
        if not pad_prefill:
            return chunks, False
        tokens = sum(c.num_tokens for c in chunks)
        size = bucket_for(tokens, PREFILL_BUCKETS)
        if size is None or size == tokens:
            return chunks, False
        return chunks + [self._dummy(size - tokens)], False

    def _dummy(self, num_tokens: int) -> ScheduledChunk:
        """A sequence of `num_tokens` tokens at positions 0.. whose every block is the scratch block
        (its KV lands there and is never read by a real sequence)."""
        num_blocks = -(-num_tokens // self.kv.block_size)
        seq = Sequence(request_id="padding", tokens=[0] * num_tokens, num_prompt_tokens=num_tokens, params=None,
                       arrival=-1)
        seq.tables = {name: [block] * num_blocks for name, block in self._scratch.items()}
        return ScheduledChunk(seq, 0, num_tokens, samples=False)
