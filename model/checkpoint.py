"""Checkpoint I/O in the Hugging Face layout: `config.json` plus one `model.safetensors` or several
shards with `model.safetensors.index.json`, and for a vision model the image processor's
`preprocessor_config.json` (read once here; the loaded model carries the processor).

The model is built on the `meta` device and filled tensor by tensor from memory-mapped files
(`load_state_dict(assign=True)`: no double copies). An expert shard passes `experts=range(a, b)`
and reads only rows `a..b` of every stacked expert tensor; the other experts never leave the disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from model.config import Llama4Config
from model.errors import CheckpointError
from model.image import ImageProcessor
from model.llama4 import Llama4
from model.moe import Experts
from model.processor_config import PREPROCESSOR_FILE, PROCESSOR_FILE
from model.vision import Projector, VisionModel

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_STACKED_EXPERTS = (".feed_forward.experts.gate_up_proj", ".feed_forward.experts.down_proj")


def tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint at `path` to the file that holds it."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (no 'weight_map'): {e}") from e
        return {name: path / file for name, file in weight_map.items()}
    files = [path / SINGLE_FILE] if (path / SINGLE_FILE).is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors weights (expected {SINGLE_FILE} or {INDEX_FILE})")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            names.update({name: file for name in f.keys()})
    return names


def fingerprint(path: str | Path, sample_bytes: int = 1 << 16) -> str:
    """A cheap identity of the checkpoint at `path`: config.json, the image processor config (it
    shapes image embeddings) and, for every weight file, its size and first and last
    `sample_bytes` (the safetensors header and some weights). Two checkpoints share it only if
    they are the same files; it keys the shared KV cache."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=16, person=b"herd-model")
    h.update((path / "config.json").read_bytes())
    for name in (PROCESSOR_FILE, PREPROCESSOR_FILE):  # absent files leave older fingerprints as they were
        if (path / name).is_file():
            h.update(name.encode() + (path / name).read_bytes())
    for file in sorted(set(tensor_files(path).values())):
        size = file.stat().st_size
        h.update(file.name.encode() + size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            h.update(f.read(sample_bytes))
            f.seek(max(0, size - sample_bytes))
            h.update(f.read(sample_bytes))
    return h.hexdigest()


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    experts: range | None = None,
    expert_kernel: str = "reference",
    progress: bool | None = None,
) -> Llama4:
    """Load a Llama 4 checkpoint directory into a `Llama4` in `dtype` on `device`.

    `experts`: keep only these routed experts (an expert shard's slice); `expert_kernel`: their
    kernel (model/expert_kernel.py); `progress`: show a
    progress bar (None: only on a terminal). Raises `ConfigError` / `CheckpointError` naming the
    file, field or tensor that is wrong."""
    path = Path(path)
    cfg = Llama4Config.from_dir(path)
    _check_expert_range(experts, cfg)
    processor = image_processor(path, cfg)
    with torch.device("meta"):
        model = Llama4(cfg, experts, expert_kernel, processor)
    start = time.perf_counter()
    state = _read_state(path, model, device, dtype, experts, progress)
    model.load_state_dict(state, assign=True, strict=True)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    log.info("loaded %s: %d tensors, %.2f GiB in %.1f s", path, len(state), nbytes / 2**30, time.perf_counter() - start)
    return model.eval().requires_grad_(False)


def image_processor(path: str | Path, cfg: Llama4Config) -> ImageProcessor | None:
    """The image processor of the checkpoint at `path` (None for a text-only one): its
    preprocessor_config.json, validated against the vision tower. `load` and `load_vision` attach it."""
    return None if cfg.vision is None else ImageProcessor.from_dir(path, cfg.vision)


class VisionTower(torch.nn.Module):
    """The vision encoder and projector alone (what the VisionEncoder service holds), with the
    checkpoint's parameter names, and the checkpoint's `image_processor`."""

    def __init__(self, cfg: Llama4Config, image_processor: ImageProcessor):
        super().__init__()
        self.cfg = cfg
        self.image_processor = image_processor
        assert cfg.vision is not None  # load_vision checks it
        self.vision_model = VisionModel(cfg.vision)
        self.multi_modal_projector = Projector(cfg.vision.vision_output_dim, cfg.text.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles `[N, 3, S, S]` -> text-width embeddings `[N * tokens_per_tile, hidden]`."""
        return self.multi_modal_projector(self.vision_model(pixel_values).flatten(0, 1))


def load_vision(path: str | Path, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> VisionTower:
    """Only the vision tower and projector of a checkpoint (with its image processor); no decoder weight is read."""
    path = Path(path)
    cfg = Llama4Config.from_dir(path)
    if cfg.vision is None:
        raise CheckpointError(f"{path} has no vision_config: it is a text-only checkpoint")
    processor = image_processor(path, cfg)
    assert processor is not None  # cfg.vision is set
    with torch.device("meta"):
        tower = VisionTower(cfg, processor)
    tower.load_state_dict(_read_state(path, tower, device, dtype, None, False), assign=True, strict=True)
    return tower.eval().requires_grad_(False)


def _check_expert_range(experts: range | None, cfg: Llama4Config) -> None:
    num = cfg.text.num_local_experts
    if experts is not None and not (0 <= experts.start <= experts.stop <= num and experts.step == 1):
        raise CheckpointError(f"expert range {experts} is not a contiguous slice of 0..{num}")


def load_expert_shard(path: str | Path, experts: range, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, expert_kernel: str = "reference") -> dict[int, Experts]:
    """Only the routed experts `experts` of every MoE layer, keyed by layer: what an expert-shard
    actor holds. No other tensor is read."""
    path = Path(path)
    cfg = Llama4Config.from_dir(path)
    _check_expert_range(experts, cfg)
    text = cfg.text
    files = tensor_files(path)
    prefix = "" if any(n.startswith("language_model.") for n in files) else "language_model."
    shard: dict[int, Experts] = {}
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), "pt")) for f in set(files.values())}
        assert text.moe_layers is not None  # TextConfig.__post_init__
        for layer in text.moe_layers:
            with torch.device("meta"):
                module = Experts(text.hidden_size, text.intermediate_size, len(experts), experts.start, expert_kernel)
            state = {}
            for name, param in module.named_parameters():
                full = f"language_model.model.layers.{layer}.feed_forward.experts.{name}"
                key = full if full in files else full.removeprefix(prefix)
                if key not in files:
                    raise CheckpointError(f"{path}: tensor {full!r} is missing")
                state[name] = _read_tensor(handles[files[key]], key, tuple(param.shape), experts, path)
                state[name] = state[name].to(device=device, dtype=dtype)
            module.load_state_dict(state, assign=True)
            shard[layer] = module.eval().requires_grad_(False)
    return shard


def _read_state(path, model, device, dtype, experts, progress) -> dict[str, torch.Tensor]:
    files = tensor_files(path)
    prefix = "" if any(n.startswith("language_model.") for n in files) else "language_model."
    expected = {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), "pt")) for f in set(files.values())}
        bar = tqdm(expected.items(), desc=f"loading {path.name}", unit="tensor", disable=_bar_disabled(progress))
        for name, shape in bar:
            key = name if name in files else name.removeprefix(prefix)
            if key not in files:
                raise CheckpointError(f"{path}: tensor {name!r} is missing (expected shape {list(shape)})")
            state[name] = _read_tensor(handles[files[key]], key, shape, experts, path)
            state[name] = state[name].to(device=device, dtype=dtype)
    return state


def _bar_disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # tqdm: None = only on a terminal


def _read_tensor(handle, key: str, shape: tuple[int, ...], experts: range | None, path: Path) -> torch.Tensor:
    sliced = experts is not None and key.endswith(_STACKED_EXPERTS)
    view = handle.get_slice(key)
    stored = tuple(view.get_shape())
    full = (stored[0],) + shape[1:] if sliced else shape
    if stored != full:
        raise CheckpointError(f"{path}: tensor {key!r} has shape {list(stored)}, the config expects {list(full)}")
    if sliced:
        assert experts is not None
        return view[experts.start : experts.stop]
    return view[:]
