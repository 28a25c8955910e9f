"""Synthetic checkpoints in the exact Hugging Face Llama 4 layout (config.json, safetensors shards
with an index, tokenizer.json + tokenizer_config.json, generation_config.json, and for a vision
model preprocessor_config.json: the default processor with tiles of the tower's image_size).
`config_only` writes all of that but the weights: enough to size a deployment (`herd plan`),
not to serve it. `quantize="fp8"` writes Meta's FP8 release layout (model/quantization.py): the same
random weights, then every Linear and routed-expert tensor that `FP8_MODULES_TO_NOT_CONVERT` leaves
converted stored as float8_e4m3fn with fp32 per-output-channel scales, and the `quantization_config`
(`quant_method: fbgemm_fp8`) in config.json.

Weights are random but well-conditioned: projections scaled by 1/sqrt(fan_in) so activations stay
O(1) and a random model still has distinct logits and decisive routing (greedy decoding is stable
under float reordering); norms near 1. Deterministic for a seed, on any device.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from model.checkpoint import INDEX_FILE, SINGLE_FILE
from model.config import Llama4Config
from model.llama4 import Llama4
from model.presets import REAL_VOCAB_SIZES, SpecialIds, preset
from model.processor_config import ImageProcessorConfig
from model.quantization import Fp8CheckpointConfig, fp8_quantize_rows, should_convert
from model.synth_tokenizer import write_synthetic_tokenizer

log = logging.getLogger(__name__)

# What the FP8 synthetic checkpoints keep in bf16 (module names, transformers' pattern rules): attention,
# MoE gates, the vision tower and projector, lm_head. Routed experts, shared experts and dense MLPs are FP8.
FP8_MODULES_TO_NOT_CONVERT = [r"language_model\.model\.layers\.\d+\.self_attn",
                              r"language_model\.model\.layers\.\d+\.feed_forward\.router",
                              "vision_model", "multi_modal_projector", "language_model.lm_head"]


def synthesize(
    out: str | Path,
    preset_name: str,
    *,
    seed: int = 0,
    num_layers: int | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    max_shard_bytes: int = 4 * 2**30,
    progress: bool | None = None,
    config_only: bool = False,
    quantize: str = "none",
) -> Llama4Config:
    """Write a synthetic checkpoint of preset `preset_name` to `out` and return its config.

    `vocab_size` pads the embedding beyond the tokenizer (as real checkpoints do); `num_layers`
    shortens the decoder; `max_shard_bytes` splits the weights into shards with an index.
    `config_only`: every file but the weights (any weights already in `out` are removed, so the
    directory never pairs this config with another model's tensors); there `vocab_size` defaults to
    the real vocabulary of a real preset (`REAL_VOCAB_SIZES`: Scout and Maverick have 202048 rows),
    so the config sizes like the released checkpoint. `quantize`: none, or fp8 (Meta's FP8 layout)."""
    if quantize not in ("none", "fp8"):
        raise ValueError(f"quantize must be none or fp8 (Meta's FP8 release format), got {quantize!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = write_synthetic_tokenizer(out, seed=seed)
    ids = SpecialIds.from_tokenizer(tok)
    if config_only and vocab_size is None:
        vocab_size = REAL_VOCAB_SIZES.get(preset_name)
    if vocab_size is not None:
        if vocab_size < ids.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {ids.vocab_size}")
        ids = replace(ids, vocab_size=vocab_size)
    cfg = preset(preset_name, ids, num_layers=num_layers)
    cfg.save(out, dtype=str(dtype).removeprefix("torch."))
    fp8 = Fp8CheckpointConfig(modules_to_not_convert=FP8_MODULES_TO_NOT_CONVERT) if quantize == "fp8" else None
    if fp8 is not None:
        data = json.loads((out / "config.json").read_text())
        data["quantization_config"] = fp8.to_hf_dict()
        (out / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    _write_generation_config(out, cfg)
    if cfg.vision is not None:
        ImageProcessorConfig.default_for(cfg.vision).save(out)
    if config_only:
        _remove_weights(out)
        log.info("wrote the %s config (no weights) to %s", preset_name, out)
        return cfg
    num_text = min(ids.bos, ids.vocab_size)  # the special tokens follow the text tokens
    _write_weights(out, cfg, seed, dtype, torch.device(device), max_shard_bytes, progress, num_text, fp8)
    log.info("wrote synthetic %s checkpoint to %s", preset_name, out)
    return cfg


def _write_generation_config(out: Path, cfg: Llama4Config) -> None:
    gen = {"bos_token_id": cfg.text.bos_token_id, "eos_token_id": list(cfg.text.eos_token_id),
           "pad_token_id": cfg.text.pad_token_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """A random tensor for parameter `name`, scaled for its role."""
    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device) * std

    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return normal(0.02)
    if "norm" in name:  # RMSNorm / LayerNorm weights
        return 1.0 + normal(0.1)
    if name.endswith("embed_tokens.weight"):
        return normal(1.0)
    if name.endswith(("class_embedding", "positional_embedding_vlm")):
        return normal(shape[-1] ** -0.5)
    if name.endswith("router.weight"):
        return normal(4.0 * shape[-1] ** -0.5)  # decisive top-k choices
    fan_in = shape[-2] if leaf in ("gate_up_proj", "down_proj") and len(shape) == 3 else shape[-1]
    return normal(fan_in**-0.5)


def fp8_tensors(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Meta's FP8 tensors for parameter `name` (transformers' `FbgemmFp8Quantize.convert`): a Linear's
    `weight` `[out, in]` -> itself in e4m3 + `weight_scale` `[out, 1]`; stacked experts `[E, K, N]` ->
    themselves in e4m3 + a scale per output column, `[E, 1, N]` (gate_up_proj) or `[E, N, 1]` (down_proj)."""
    if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        q, scale = fp8_quantize_rows(tensor.transpose(1, 2))  # [E, N, K] rows: per output channel
        e, n, _ = q.shape
        shape = (e, 1, n) if name.endswith("gate_up_proj") else (e, n, 1)
        return {name: q.transpose(1, 2).contiguous(), name + "_scale": scale.reshape(shape).contiguous()}
    q, scale = fp8_quantize_rows(tensor)
    return {name: q, name.removesuffix("weight") + "weight_scale": scale[:, None].contiguous()}


def _is_fp8(name: str, fp8: Fp8CheckpointConfig | None) -> bool:
    if fp8 is None:
        return False
    module, _, leaf = name.rpartition(".")
    expert = name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
    linear = leaf == "weight" and "norm" not in module and not module.endswith("embed_tokens")
    return (expert or linear) and should_convert(module, fp8.modules_to_not_convert)


def _write_weights(out, cfg, seed, dtype, device, max_shard_bytes, progress, num_text_tokens, fp8=None) -> None:
    """Generate tensor by tensor and flush each shard as soon as it is full (bounded host memory).
    The lm_head rows of special and padding tokens are damped so a random model mostly writes text.
    With `fp8`, the tensors it converts are written in Meta's FP8 layout (`fp8_tensors`), quantized
    from the `dtype` values an unquantized checkpoint of the same seed holds."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Llama4(cfg).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    files: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        file = out / f"shard-{len(files):05d}.tmp"
        save_file(shard, str(file), metadata={"format": "pt"})
        files.append((file, list(shard)))
        shard.clear()

    size, total = 0, 0
    disable = None if progress is None else not progress
    for name, shape in tqdm(shapes.items(), desc=f"synthesizing {out.name}", unit="tensor", disable=disable):
        tensor = init_tensor(name, shape, gen, device)
        if name.endswith("lm_head.weight"):
            tensor[num_text_tokens:] *= 0.1
        tensor = tensor.to(dtype).cpu()
        tensors = fp8_tensors(name, tensor) if _is_fp8(name, fp8) else {name: tensor}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard.update(tensors)
        size, total = size + nbytes, total + nbytes
    flush()
    _name_shards(out, files, total)


def _remove_weights(out: Path) -> None:
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)


def _name_shards(out: Path, files: list[tuple[Path, list[str]]], total: int) -> None:
    """Give the shards their Hugging Face names; several shards get an index file."""
    _remove_weights(out)
    if len(files) == 1:
        files[0][0].rename(out / SINGLE_FILE)
        return
    weight_map = {}
    for i, (tmp, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        tmp.rename(out / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
