"""A step's integer inputs (token ids, positions, KV cache slots per group, the rows that sample,
the rows image embeddings replace), built on the host and moved to the device in one copy.

All of them are laid out in one int64 buffer: pinned host memory on CUDA, copied with one
non-blocking copy into a persistent device buffer, of which the model reads views. Nothing here
waits for the device (no `torch.tensor(list)` per sequence, no `.tolist()`/`.item()`/`nonzero`);
on the CPU the host buffer is the device buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deployments.engine.kv_manager import KVManager
from deployments.engine.scheduler import ScheduledChunk


@dataclass(frozen=True)
class StepBatch:
    """Views of the device buffer for one step of `num_tokens` query rows."""

    ids: torch.Tensor  # [T] token ids
    positions: torch.Tensor  # [T] absolute positions
    slots: dict[str, torch.Tensor]  # KV group name -> [T] flat cache slot of every row's new KV
    sample_rows: torch.Tensor  # [S] the last row of each sampling chunk, in chunk order
    image_rows: torch.Tensor  # [P] rows whose embedding an image embedding replaces (P = 0: text only)
    image_embeds: list[torch.Tensor]  # the embeddings of those rows, in row order


class StepInputs:
    def __init__(self, kv: KVManager, device: torch.device, capacity: int = 4096):
        self.kv = kv
        self.device = device
        self._copied: torch.cuda.Event | None = None
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        cuda = self.device.type == "cuda"
        self._host = torch.empty(capacity, dtype=torch.long, pin_memory=cuda)
        self._host_np = self._host.numpy()
        self._dev = torch.empty(capacity, dtype=torch.long, device=self.device) if cuda else self._host

    def stage(self, chunks: list[ScheduledChunk]) -> StepBatch:
        """Fill the buffers for `chunks` (a flattened varlen batch, in order); one host-to-device copy."""
        bs = self.kv.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: dict[str, list[int]] = {g.name: [] for g in self.kv.groups}
        sample_rows: list[int] = []
        image_rows: list[int] = []
        image_embeds: list[torch.Tensor] = []
        row = 0
        for c in chunks:
            seq, start, end = c.seq, c.start, c.start + c.num_tokens
            ids += seq.tokens[start:end]
            span = range(start, end)
            positions += span
            for name, out in slots.items():
                table = seq.tables[name]
                out += [table[p // bs] * bs + p % bs for p in span]
            if seq.images:
                offsets = seq.patch_offsets(start, end)
                if offsets:
                    image_rows += [row + o for o in offsets]
                    embeds = seq.image_rows(start, end)
                    assert embeds is not None  # patch offsets come with their embedding rows
                    image_embeds.append(embeds)
            row += c.num_tokens
            if c.samples:
                sample_rows.append(row - 1)
        values = ids + positions + [s for out in slots.values() for s in out] + sample_rows + image_rows
        n = len(values)
        if self._copied is not None:  # the last step's copy must have read the host buffer before it is rewritten
            self._copied.synchronize()
        if n > self._host.numel():
            self._allocate(max(n, 2 * self._host.numel()))
        self._host_np[:n] = values
        if self._dev is not self._host:
            self._dev[:n].copy_(self._host[:n], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        views = iter(self._dev[:n].split([row, row, *[row] * len(slots), len(sample_rows), len(image_rows)]))
        batch_ids, batch_positions = next(views), next(views)
        batch_slots = {name: next(views) for name in slots}
        return StepBatch(batch_ids, batch_positions, batch_slots, next(views), next(views), image_embeds)
