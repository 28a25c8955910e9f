"""Checkpoint I/O in the Hugging Face layout: `config.json` plus one `model.safetensors` or several
shards with `model.safetensors.index.json`, and for a vision model the image processor's
`preprocessor_config.json` (read once here; the loaded model carries the processor).

The model is built on the `meta` device and filled tensor by tensor from memory-mapped files
(`load_state_dict(assign=True)`: no double copies). An expert shard passes `experts=range(a, b)`
and reads only rows `a..b` of every stacked expert tensor; the other experts never leave the disk.

Quantization (model/quantization.py): `quantization="fp8" | "int4"` quantizes the routed experts as
they are read, one stacked tensor at a time on the target device (an expert shard only its slice).
A checkpoint in Meta's FP8 format (`quantization_config.quant_method: fbgemm_fp8`) is served as
FP8: its FP8 experts and Linears are kept as stored (weights and scales), the rest is read in `dtype`.
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
from model.quantization import (
    DEFAULT_ACTIVATION_SCALE_UB,
    FP8,
    ExpertWeight,
    Fp8CheckpointConfig,
    Fp8ExpertWeights,
    Fp8Linear,
    checkpoint_quantization,
    quantize_experts,
    served_expert_quantization,
)
from model.vision import Projector, VisionModel

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_STACKED_EXPERTS = (".feed_forward.experts.gate_up_proj", ".feed_forward.experts.down_proj",
                    ".feed_forward.experts.gate_up_proj_scale", ".feed_forward.experts.down_proj_scale")  # FP8


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


def fingerprint(path: str | Path, sample_bytes: int = 1 << 16, quantization: str = "none") -> str:
    """A cheap identity of the checkpoint at `path`: config.json, the image processor config (it
    shapes image embeddings) and, for every weight file, its size and first and last
    `sample_bytes` (the safetensors header and some weights). Two checkpoints share it only if
    they are the same files; it keys the shared KV cache. `quantization`: the experts' on-the-fly
    quantization (it changes the outputs; 'none' leaves the fingerprint as it was)."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=16, person=b"herd-model")
    h.update((path / "config.json").read_bytes())
    if quantization != "none":
        h.update(b"experts:" + quantization.encode())
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
    quantization: str = "none",
    progress: bool | None = None,
) -> Llama4:
    """Load a Llama 4 checkpoint directory into a `Llama4` in `dtype` on `device`.

    `experts`: keep only these routed experts (an expert shard's slice); `expert_kernel`: their
    kernel (model/expert_kernel.py); `quantization`: none | fp8 | int4, the routed experts'
    (an FP8 checkpoint is FP8 whatever is asked, int4 refused); `progress`: show a
    progress bar (None: only on a terminal). Raises `ConfigError` / `CheckpointError` naming the
    file, field or tensor that is wrong."""
    path = Path(path)
    cfg = Llama4Config.from_dir(path)
    _check_expert_range(experts, cfg)
    fp8 = checkpoint_quantization(path)
    mode = served_expert_quantization(quantization, fp8)
    processor = image_processor(path, cfg)
    with torch.device("meta"):
        model = Llama4(cfg, experts, expert_kernel, processor)
    start = time.perf_counter()
    state = _read_state(path, model, device, dtype, experts, progress, mode, fp8)
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
    state = _read_state(path, tower, device, dtype, None, False, "none", checkpoint_quantization(path))
    tower.load_state_dict(state, assign=True, strict=True)
    return tower.eval().requires_grad_(False)


def _check_expert_range(experts: range | None, cfg: Llama4Config) -> None:
    num = cfg.text.num_local_experts
    if experts is not None and not (0 <= experts.start <= experts.stop <= num and experts.step == 1):
        raise CheckpointError(f"expert range {experts} is not a contiguous slice of 0..{num}")


def load_expert_shard(path: str | Path, experts: range, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, expert_kernel: str = "reference",
                      quantization: str = "none") -> dict[int, Experts]:
    """Only the routed experts `experts` of every MoE layer, keyed by layer: what an expert-shard
    actor holds, quantized as `load` would (only this slice is read and quantized). No other tensor is read."""
    path = Path(path)
    cfg = Llama4Config.from_dir(path)
    _check_expert_range(experts, cfg)
    fp8 = checkpoint_quantization(path)
    mode = served_expert_quantization(quantization, fp8)
    text = cfg.text
    files = tensor_files(path)
    prefix = "" if any(n.startswith("language_model.") for n in files) else "language_model."
    shard: dict[int, Experts] = {}
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), "pt")) for f in set(files.values())}
        reader = _Reader(path, files, handles, prefix, device, dtype, experts, mode, fp8)
        assert text.moe_layers is not None  # TextConfig.__post_init__
        for layer in text.moe_layers:
            with torch.device("meta"):
                module = Experts(text.hidden_size, text.intermediate_size, len(experts), experts.start, expert_kernel)
            base = f"language_model.model.layers.{layer}.feed_forward.experts"
            module.set_weights(*(reader.stacked(f"{base}.{name}", tuple(getattr(module, name).shape))
                                 for name in ("gate_up_proj", "down_proj")))
            shard[layer] = module.eval().requires_grad_(False)
    return shard


class _Reader:
    """Reads tensors of one checkpoint by model name (with or without the `language_model.` prefix
    of a text-only checkpoint), sliced to the expert range, converted for the model."""

    def __init__(self, path: Path, files: dict[str, Path], handles: dict, prefix: str, device, dtype: torch.dtype,
                 experts: range | None, mode: str, fp8: Fp8CheckpointConfig | None):
        self.path, self.files, self.handles, self.prefix = path, files, handles, prefix
        self.device, self.dtype, self.experts, self.mode, self.fp8 = device, dtype, experts, mode, fp8

    def key(self, name: str) -> str | None:
        """The checkpoint's key of model tensor `name` (None: not in the checkpoint)."""
        key = name if name in self.files else name.removeprefix(self.prefix)
        return key if key in self.files else None

    def raw(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = self.key(name)
        if key is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing (expected shape {list(shape)})")
        return _read_tensor(self.handles[self.files[key]], key, shape, self.experts, self.path)

    def tensor(self, name: str, shape: tuple[int, ...], keep_dtype: torch.dtype | None = None) -> torch.Tensor:
        """A plain tensor in the model's dtype, or (FP8 Linear buffers) checked to be `keep_dtype` and kept so."""
        t = self.raw(name, shape)
        if keep_dtype is None:
            if t.dtype == FP8:
                raise CheckpointError(f"{self.path}: tensor {name!r} is FP8 but has no '_scale' tensor beside it")
            return t.to(device=self.device, dtype=self.dtype)
        if t.dtype != keep_dtype:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {t.dtype}, an FP8 checkpoint stores {keep_dtype}")
        return t.to(device=self.device)

    def stacked(self, name: str, shape: tuple[int, ...]) -> ExpertWeight:
        """A stacked expert weight `[E, K, N]` (this reader's expert slice): FP8 as stored when the
        checkpoint has it so, else read in its stored dtype and quantized on the device (`mode`)."""
        scale_key = self.key(name + "_scale")
        if scale_key is None:
            w = self.raw(name, shape)
            if w.dtype == FP8:
                raise CheckpointError(f"{self.path}: tensor {name!r} is FP8 but {name + '_scale'!r} is missing")
            w = w.to(self.device)
            return w.to(self.dtype) if self.mode == "none" else quantize_experts(w, self.mode)
        e, k, n = shape
        scale_shape = (e, 1, n) if name.endswith("gate_up_proj") else (e, n, 1)  # FbgemmFp8Llama4TextExperts
        w, scale = self.raw(name, shape), self.raw(name + "_scale", scale_shape)
        if w.dtype != FP8 or scale.dtype != torch.float32:
            raise CheckpointError(f"{self.path}: {name!r} ({w.dtype}) with a '_scale' ({scale.dtype}) must be "
                                  "float8_e4m3fn with float32 scales (Meta's FP8 format)")
        ub = self.fp8.activation_scale_ub if self.fp8 is not None else DEFAULT_ACTIVATION_SCALE_UB
        return Fp8ExpertWeights.from_fbgemm(w.to(self.device), scale.to(self.device), ub)


def _use_fp8_linears(model: torch.nn.Module, reader: _Reader) -> set[str]:
    """Swap every `nn.Linear` the checkpoint stores in FP8 (a `weight_scale` beside its weight) for an
    `Fp8Linear` (on the meta device); the names of their FP8 weights and scales."""
    assert reader.fp8 is not None
    kept = set()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and reader.key(f"{name}.weight_scale") is not None:
            with torch.device("meta"):
                fp8 = Fp8Linear(module.in_features, module.out_features, module.bias is not None,
                                reader.fp8.activation_scale_ub)
            model.set_submodule(name, fp8)
            kept |= {f"{name}.weight", f"{name}.weight_scale"}
    return kept


def _read_state(path, model, device, dtype, experts, progress, mode: str = "none",
                fp8: Fp8CheckpointConfig | None = None) -> dict[str, torch.Tensor]:
    """Every tensor `model` (on the meta device) holds, read from the checkpoint; stacked routed
    experts are read (and quantized) through `_Reader.stacked` and set on their `Experts` module."""
    files = tensor_files(path)
    prefix = "" if any(n.startswith("language_model.") for n in files) else "language_model."
    state: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), "pt")) for f in set(files.values())}
        reader = _Reader(path, files, handles, prefix, device, dtype, experts, mode, fp8)
        kept = _use_fp8_linears(model, reader) if fp8 is not None else set()
        stacked = {name: m for name, m in model.named_modules() if isinstance(m, Experts)}
        expected = {name: t for name, t in model.state_dict(keep_vars=True).items()
                    if name.rpartition(".")[0] not in stacked}
        bar = tqdm(total=len(expected) + 2 * len(stacked), desc=f"loading {path.name}", unit="tensor",
                   disable=_bar_disabled(progress))
        for name, t in expected.items():
            state[name] = reader.tensor(name, tuple(t.shape), t.dtype if name in kept else None)
            bar.update()
        for name, module in stacked.items():
            module.set_weights(*(reader.stacked(f"{name}.{w}", tuple(getattr(module, w).shape))
                                 for w in ("gate_up_proj", "down_proj")))
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
            bar.update(2)
        bar.close()
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
