"""`herd plan`: what serving a Llama 4 checkpoint with Herd takes, from its config.json alone (no weights).

The deployment sized is the one Herd runs (cluster/app.py):

- a **router-service replica** (one GPU each) holds the attention/dense part: embeddings,
  attention, dense MLPs (Maverick's odd layers), shared experts, MoE gates, norms and lm_head; and,
  because `model.checkpoint.load` builds the whole `Llama4`, the vision tower + projector too.
  What its GPU has left after the headroom is its paged KV cache (`engine.kv_cache_bytes`);
- the **routed experts** are split over expert shards (`experts.mode: sharded`), one GPU each, each
  shard holding a contiguous range of experts in every MoE layer
  (`deployments.expert_shard.split_experts`); all replicas share the shards. With no shard
  (colocated, `num_expert_shards=0`) every replica holds all experts itself;
- the VisionEncoder deployment holds one more copy of the vision tower (`vision_bytes`), wherever
  its `vision.num_gpus` puts it: it is not counted in `num_gpus`.

Parameters are counted on the model Herd builds (a `Llama4` on the meta device: shapes, no memory),
so they are the tensors a checkpoint of this config holds. **Active** parameters are the ones one
token runs through: every text parameter except the routed experts (embeddings and lm_head
included), plus `num_experts_per_tok` routed experts in each MoE layer; the vision tower is
excluded (it runs once per image tile, not per token).

Weights are sized in the checkpoint's `torch_dtype` (bf16 when absent); routed experts in their
served precision (`expert_quantization`: none, fp8 or int4, scales included, model/quantization.py's
`expert_weight_bytes`). A checkpoint in Meta's FP8 format (`quantization_config` fbgemm_fp8) has FP8
experts and FP8 Linears wherever its `modules_to_not_convert` leaves them (1 byte + a 4-byte scale per
output channel); other quantization methods are refused (`read_weight_dtype`). The KV cache
is sized by the engine's own arithmetic (`deployments.engine.kv_sizing.plan_kv_groups`,
`KVCache.bytes_per_block`): full-history (NoPE) layers keep every token, chunked RoPE layers one
`attention_chunk_size` chunk per sequence. A `kv_dtype` other than the weights' is a what-if: the
engine keeps its KV cache in the model's dtype.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deployments.engine.config import EngineConfig
from deployments.engine.kv_cache import KVCache
from deployments.engine.kv_sizing import chunked_blocks_per_seq, plan_kv_groups
from model.config import Llama4Config
from model.errors import ConfigError
from model.quantization import (
    Fp8CheckpointConfig,
    checkpoint_quantization,
    expert_weight_bytes,
    served_expert_quantization,
    should_convert,
)

if TYPE_CHECKING:
    from deployments.config import HerdConfig

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                                  "fp8": torch.float8_e4m3fn}
WEIGHT_DTYPES = ("bf16", "fp16", "fp32")  # unquantized weights; quantized experts: expert_quantization
_HF_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float": "fp32", "half": "fp16"}
DEFAULT_HEADROOM = 0.10
GiB = 2**30


class PlanDoesNotFit(ValueError):
    """The deployment asked for does not fit the GPUs (the message lists what to change)."""


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a Llama 4 model by part. `dense` is what a router-service replica holds of the text model."""

    embeddings: int
    attention: int
    dense_mlp: int
    shared_experts: int
    moe_gates: int
    norms: int
    lm_head: int
    routed_experts: int
    vision: int  # vision tower + projector
    other: int = 0  # a text parameter of none of the kinds above (counted as dense)

    @property
    def dense(self) -> int:
        return (self.embeddings + self.attention + self.dense_mlp + self.shared_experts + self.moe_gates
                + self.norms + self.lm_head + self.other)

    @property
    def total(self) -> int:
        return self.dense + self.routed_experts + self.vision


def _kind(name: str) -> str:
    if name.startswith(("vision_model.", "multi_modal_projector.")):
        return "vision"
    for part, kind in ((".feed_forward.experts.", "routed_experts"), (".feed_forward.router.", "moe_gates"),
                       (".feed_forward.shared_expert.", "shared_experts"), (".feed_forward.", "dense_mlp"),
                       (".self_attn.", "attention"), ("embed_tokens.", "embeddings"), ("lm_head.", "lm_head")):
        if part in name:
            return kind
    return "norms" if "norm" in name else "other"


def count_params(cfg: Llama4Config) -> ParamCounts:
    """Every parameter of the `Llama4` this config builds, by part (on the meta device: no memory)."""
    from model.llama4 import Llama4

    with torch.device("meta"):
        model = Llama4(cfg)
    counts = dict.fromkeys(ParamCounts.__dataclass_fields__, 0)
    for name, p in model.named_parameters():
        counts[_kind(name)] += p.numel()
    return ParamCounts(**counts)


@dataclass(frozen=True)
class Plan:
    # the model
    num_layers: int
    num_moe_layers: int
    num_experts: int
    experts_per_tok: int
    params: ParamCounts
    weight_dtype: str
    expert_quantization: str  # none | fp8 | int4: the routed experts' precision as served
    dense_bytes: int  # the attention/dense part (ParamCounts.dense)
    expert_bytes: int  # all routed experts
    vision_bytes: int  # vision tower + projector
    # the deployment
    gpus: int  # available
    gpu_memory_bytes: int
    headroom: float  # fraction of each GPU left free for activations
    replicas: int  # router-service replicas
    num_expert_shards: int  # 0: colocated (every replica holds the experts)
    experts_per_shard: int  # the largest shard's
    shard_bytes: int  # the largest shard's weights
    replica_bytes: int  # the weights on one router-service replica's GPU
    num_gpus: int  # needed
    # the KV cache of one router-service replica
    kv_dtype: str
    kv_cache_bytes: int  # engine.kv_cache_bytes
    kv_bytes_per_token: int  # all layers
    kv_bytes_per_token_full: int  # the full-history (NoPE) layers
    kv_bytes_per_token_chunked: int  # the chunked RoPE layers
    num_full_layers: int
    num_chunked_layers: int
    attention_chunk_size: int | None
    kv_tokens_per_replica: int  # tokens of history the replica holds, over all its sequences
    kv_full_chunk_seqs: int  # sequences whose whole chunk the chunked layers hold at once
    fits: bool
    warnings: tuple[str, ...]

    @property
    def total_params(self) -> int:
        return self.params.total

    @property
    def active_params(self) -> int:
        """Per token: the dense part plus `experts_per_tok` routed experts of each MoE layer (no vision)."""
        return self.params.dense + self.params.routed_experts * self.experts_per_tok // self.num_experts

    @property
    def usable_bytes_per_gpu(self) -> int:
        return int(self.gpu_memory_bytes * (1 - self.headroom))

    @property
    def bytes_per_expert(self) -> int:
        """One routed expert over every MoE layer (what a shard holds per expert)."""
        return self.expert_bytes // self.num_experts

    def herd_config(self) -> dict[str, Any]:
        """The HerdConfig settings this plan assumes (merge them into the deployment's config)."""
        experts: dict[str, Any] = {"mode": "colocated"}
        if self.num_expert_shards:
            experts = {"mode": "sharded", "num_shards": self.num_expert_shards, "num_gpus_per_shard": 1}
        if self.expert_quantization != "none":
            experts["quantization"] = self.expert_quantization
        return {"experts": experts, "router_service": {"num_replicas": self.replicas, "num_gpus": 1},
                "engine": {"kv_cache_bytes": self.kv_cache_bytes}}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["params"] = {**out["params"], "dense": self.params.dense, "total": self.params.total}
        out["warnings"] = list(self.warnings)
        out.update(total_params=self.total_params, active_params=self.active_params,
                   usable_bytes_per_gpu=self.usable_bytes_per_gpu, bytes_per_expert=self.bytes_per_expert,
                   herd_config=self.herd_config())
        return out


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _gib_up(n: float) -> str:
    """A memory size to ask for: rounded up, so a GPU of that size is enough."""
    return f"{math.ceil(n / GiB * 10) / 10:.1f} GiB"


def make_plan(cfg: Llama4Config, gpus: int, gpu_memory_bytes: int, *, weight_dtype: str = "bf16",
              kv_dtype: str = "bf16", replicas: int = 1, headroom: float = DEFAULT_HEADROOM,
              num_expert_shards: int | None = None, kv_cache_bytes: int | None = None,
              engine: EngineConfig | None = None, expert_quantization: str = "none",
              fp8_checkpoint: Fp8CheckpointConfig | None = None) -> Plan:
    """Size a deployment of `cfg` on `gpus` GPUs of `gpu_memory_bytes` each.

    `num_expert_shards`: None picks the fewest shards whose experts fit one GPU each (or colocated
    experts, when the shards would not fit `gpus` but one replica holds the whole model); 0 means
    colocated. `kv_cache_bytes`: None gives each replica's KV cache all its GPU has left; a number
    (a config's `engine.kv_cache_bytes`) is checked against that. `engine`: the other engine settings
    the KV cache is laid out by (block size, max_num_seqs, ...; default EngineConfig()).
    `expert_quantization`: none | fp8 | int4 (`experts.quantization`); `fp8_checkpoint`: the
    `quantization_config` of a checkpoint in Meta's FP8 format (`read_fp8_config`): its experts are
    FP8 whatever is asked (int4 refused) and its converted Linears are sized in FP8."""
    for name, value, low in (("gpus", gpus, 1), ("gpu memory", gpu_memory_bytes, 1), ("replicas", replicas, 1),
                             ("expert shards", 0 if num_expert_shards is None else num_expert_shards, 0)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be a fraction in [0, 1), got {headroom}")
    for what, name, known in (("weight dtype", weight_dtype, WEIGHT_DTYPES), ("KV dtype", kv_dtype, DTYPES)):
        if name not in known:
            raise ValueError(f"{what} {name!r} is not one of {', '.join(known)}")
    try:
        expert_quantization = served_expert_quantization(expert_quantization, fp8_checkpoint)
    except ConfigError as e:
        raise ValueError(str(e)) from e
    engine = engine or EngineConfig()
    text = cfg.text
    params = count_params(cfg)
    wbytes = DTYPES[weight_dtype].itemsize
    dense_bytes, vision_bytes = (n * wbytes for n in (params.dense, params.vision))
    h, inter, moe = text.hidden_size, text.intermediate_size, len(text.moe_layers or ())
    expert_bytes = moe * (expert_weight_bytes(text.num_local_experts, h, 2 * inter, expert_quantization, wbytes)
                          + expert_weight_bytes(text.num_local_experts, inter, h, expert_quantization, wbytes))
    if fp8_checkpoint is not None:
        saved_dense, saved_vision = _fp8_linear_savings(cfg, fp8_checkpoint, wbytes)
        dense_bytes, vision_bytes = dense_bytes - saved_dense, vision_bytes - saved_vision
    num_experts = text.num_local_experts
    per_expert = expert_bytes // num_experts
    usable = int(gpu_memory_bytes * (1 - headroom))
    per_gpu = usable // per_expert if per_expert else num_experts
    fewest_shards = 0 if not expert_bytes else math.ceil(num_experts / per_gpu) if per_gpu else num_experts
    kv_sizes = _KVSizes(cfg, engine, DTYPES[kv_dtype])

    shards = fewest_shards if num_expert_shards is None else num_expert_shards
    if (num_expert_shards is None and replicas + shards > gpus and replicas <= gpus
            and kv_sizes.fits(usable - dense_bytes - vision_bytes - expert_bytes)):
        shards = 0  # the shards would not fit the GPUs, but each replica holds the whole model
    warnings: list[str] = []
    colocated = shards == 0
    replica_bytes = dense_bytes + vision_bytes + (expert_bytes if colocated else 0)
    left = usable - replica_bytes
    pct = f"{headroom:.0%} headroom"
    smallest_kv = kv_sizes.smallest()
    need = (replica_bytes + smallest_kv) / (1 - headroom)  # the smallest GPU a replica works on
    if left <= 0:
        warnings.append(f"a router-service replica's weights ({_gib(replica_bytes)}) do not fit one GPU's usable "
                        f"{_gib(usable)} ({pct}): use GPUs of at least {_gib_up(need)}"
                        + (" or shard the experts (--expert-shards)" if colocated and expert_bytes else "")
                        + " (a replica is never split over GPUs)")
    kv = left if kv_cache_bytes is None else kv_cache_bytes
    if kv_cache_bytes is not None and 0 < left < kv_cache_bytes:
        warnings.append(f"engine.kv_cache_bytes ({_gib(kv_cache_bytes)}) is more than the {_gib(left)} a "
                        f"router-service GPU has left after its weights: lower it to at most {left}")
    tokens, chunk_seqs, kv_error = kv_sizes.capacity(kv) if kv > 0 else (0, 0, None)
    if kv_error and kv_cache_bytes is not None:
        warnings.append(f"engine.kv_cache_bytes ({_gib(kv_cache_bytes)}) is less than the smallest KV cache the "
                        f"engine lays out ({_gib_up(smallest_kv)}): raise it to at least {smallest_kv}"
                        + (f" and use GPUs of at least {_gib_up(need)}" if 0 < left < smallest_kv else ""))
    elif kv_error and left > 0:
        warnings.append(f"the {_gib(kv)} a router-service GPU has left for its KV cache is less than the smallest "
                        f"KV cache the engine lays out ({_gib_up(smallest_kv)}): use GPUs of at least {_gib_up(need)}")
    if not colocated:
        largest = math.ceil(num_experts / shards)
        if shards > num_experts:
            warnings.append(f"{shards} expert shards for {num_experts} experts: use at most {num_experts} "
                            f"(one shard holds at least one expert)")
        elif per_gpu == 0:
            warnings.append(f"one routed expert ({_gib(per_expert)} over {len(text.moe_layers or ())} MoE layers) "
                            f"does not fit one GPU's usable {_gib(usable)} ({pct}): use GPUs of at least "
                            f"{_gib_up(per_expert / (1 - headroom))}")
        elif largest > per_gpu:
            warnings.append(f"{shards} expert shards hold up to {largest} experts ({_gib(largest * per_expert)}) "
                            f"each, more than one GPU's usable {_gib(usable)} ({pct}): use at least "
                            f"{fewest_shards} shards")
    else:
        largest = 0
    num_gpus = replicas + shards
    if num_gpus > gpus and (colocated or per_gpu):  # (no count of shards helps an expert that fits no GPU)
        parts = f"{replicas} router-service replica{'s' * (replicas > 1)}" + (
            f" + {shards} expert shards" if shards else " holding the experts")
        warnings.append(f"needs {num_gpus} GPUs ({parts}), {gpus} available: add {num_gpus - gpus} GPUs"
                        + (", use fewer --replicas" if replicas > 1 else "") + ", or use GPUs with more memory")
    return Plan(
        num_layers=text.num_hidden_layers, num_moe_layers=len(text.moe_layers or ()), num_experts=num_experts,
        experts_per_tok=text.num_experts_per_tok, params=params, weight_dtype=weight_dtype,
        expert_quantization=expert_quantization, dense_bytes=dense_bytes,
        expert_bytes=expert_bytes, vision_bytes=vision_bytes, gpus=gpus, gpu_memory_bytes=gpu_memory_bytes,
        headroom=headroom, replicas=replicas, num_expert_shards=shards, experts_per_shard=largest,
        shard_bytes=largest * per_expert, replica_bytes=replica_bytes, num_gpus=num_gpus, kv_dtype=kv_dtype,
        kv_cache_bytes=max(kv, 0), kv_bytes_per_token=kv_sizes.per_token(kv_sizes.full + kv_sizes.chunked),
        kv_bytes_per_token_full=kv_sizes.per_token(kv_sizes.full),
        kv_bytes_per_token_chunked=kv_sizes.per_token(kv_sizes.chunked), num_full_layers=kv_sizes.full,
        num_chunked_layers=kv_sizes.chunked,
        attention_chunk_size=text.attention_chunk_size if kv_sizes.chunked else None,
        kv_tokens_per_replica=tokens, kv_full_chunk_seqs=chunk_seqs, fits=not warnings, warnings=tuple(warnings),
    )


def _fp8_linear_savings(cfg: Llama4Config, fp8: Fp8CheckpointConfig, wbytes: int) -> tuple[int, int]:
    """Bytes an FP8 checkpoint saves on its FP8 Linears (1 byte per weight + a 4-byte scale per output
    channel instead of `wbytes` per weight): (in the dense part, in the vision tower + projector)."""
    from model.llama4 import Llama4

    with torch.device("meta"):
        model = Llama4(cfg)
    saved = {"dense": 0, "vision": 0}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and should_convert(name, fp8.modules_to_not_convert):
            kind = "vision" if _kind(name + ".weight") == "vision" else "dense"
            saved[kind] += module.weight.numel() * (wbytes - 1) - module.out_features * 4
    return saved["dense"], saved["vision"]


class _KVSizes:
    """The engine's KV arithmetic for one model, engine layout and KV dtype."""

    def __init__(self, cfg: Llama4Config, engine: EngineConfig, dtype: torch.dtype):
        self.text, self.engine, self.dtype = cfg.text, engine, dtype
        self.chunked = sum(cfg.text.is_chunked(i) for i in range(cfg.text.num_hidden_layers))
        self.full = cfg.text.num_hidden_layers - self.chunked

    def per_token(self, num_layers: int) -> int:
        return KVCache.bytes_per_block(num_layers, 1, self.text.num_key_value_heads, self.text.head_dim, self.dtype)

    def capacity(self, kv_cache_bytes: int) -> tuple[int, int, str | None]:
        """(tokens the full-history layers hold, sequences at a whole chunk, why it cannot work or None),
        as the engine lays out `kv_cache_bytes`."""
        try:
            groups = plan_kv_groups(self.text, self.engine.model_copy(update={"kv_cache_bytes": kv_cache_bytes}),
                                    self.dtype)
        except ConfigError as e:
            return 0, 0, str(e)
        blocks = {g.name: g.num_blocks for g in groups}
        bs = self.engine.block_size
        seqs = 0
        if "chunked" in blocks:
            assert self.text.attention_chunk_size is not None  # a chunked group has a chunk size
            seqs = blocks["chunked"] // chunked_blocks_per_seq(self.text.attention_chunk_size, self.engine)
        return blocks.get("full", blocks.get("chunked", 0)) * bs, seqs, None

    def fits(self, kv_cache_bytes: int) -> bool:
        return kv_cache_bytes > 0 and self.capacity(kv_cache_bytes)[2] is None

    def smallest(self) -> int:
        """The fewest bytes the engine lays a KV cache out in (found by bisection on its own sizing)."""
        low, high = 0, 2**20
        while not self.fits(high):
            low, high = high, high * 2
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if self.fits(mid) else (mid, high)
        return high


def read_fp8_config(path: str | Path) -> Fp8CheckpointConfig | None:
    """The FP8 `quantization_config` of the checkpoint at `path` (Meta's fbgemm_fp8), None for a
    bf16/fp32 one; a ConfigError names any other quantization method."""
    return checkpoint_quantization(path)


def read_weight_dtype(path: str | Path) -> str:
    """The dtype the checkpoint at `path` stores its unquantized weights in (config.json
    `torch_dtype`, or `dtype` as transformers 5 writes it; bf16 when absent), as a key of `DTYPES`.
    A quantized checkpoint other than Meta's FP8 (`read_fp8_config`) is refused."""
    read_fp8_config(path)
    data = json.loads((Path(path) / "config.json").read_text())
    text = data.get("text_config") or {}
    name = data.get("torch_dtype") or data.get("dtype") or text.get("torch_dtype") or text.get("dtype") or "bfloat16"
    if str(name) not in _HF_DTYPES:
        raise ConfigError(f"{path}: torch_dtype {name!r} is not one of {', '.join(_HF_DTYPES)}")
    return _HF_DTYPES[str(name)]


def plan_for_config(cfg: HerdConfig, gpus: int, gpu_memory_bytes: int, headroom: float = DEFAULT_HEADROOM) -> Plan:
    """The plan of a HerdConfig as it would be deployed on `gpus` GPUs of `gpu_memory_bytes` (one
    GPU per router-service replica and per expert shard): its replicas, its expert shards (none when
    the router service would run them colocated: `experts_are_sharded`), its engine.kv_cache_bytes."""
    from deployments.router_service import experts_are_sharded

    shards = cfg.experts.num_shards if experts_are_sharded(cfg.experts, gpus) else 0
    return make_plan(Llama4Config.from_dir(cfg.model), gpus, gpu_memory_bytes,
                     weight_dtype=read_weight_dtype(cfg.model), kv_dtype="bf16",
                     replicas=cfg.router_service.num_replicas, headroom=headroom, num_expert_shards=shards,
                     kv_cache_bytes=cfg.engine.kv_cache_bytes, engine=cfg.engine,
                     expert_quantization=cfg.experts.quantization, fp8_checkpoint=read_fp8_config(cfg.model))


def check_fits(plan: Plan) -> None:
    """Raise `PlanDoesNotFit` (a ValueError, so `herd` prints one line) naming what to change."""
    if not plan.fits:
        raise PlanDoesNotFit("the deployment does not fit: " + "; ".join(plan.warnings))


def format_plan(plan: Plan, model: str = "") -> str:
    """The human-readable table `herd plan` prints."""
    p = plan.params
    b = 1e9
    moe = f"{plan.num_moe_layers} of {plan.num_layers} layers MoE"
    rows = [
        ("model", f"{model + ': ' if model else ''}{plan.num_experts} experts (top-{plan.experts_per_tok}), {moe}, "
                  f"weights {plan.weight_dtype}"
                  + (f", routed experts {plan.expert_quantization}" if plan.expert_quantization != "none" else "")),
        ("parameters", f"{p.total / b:.2f} B total, {plan.active_params / b:.2f} B active per token "
                       f"(dense part + top-{plan.experts_per_tok} routed experts of each MoE layer; vision not "
                       f"counted)"),
        ("attention/dense", f"{_gib(plan.dense_bytes)}  ({p.dense / b:.2f} B: embeddings, attention, dense MLPs, "
                            f"shared experts, MoE gates, norms, lm_head)"),
        ("routed experts", f"{_gib(plan.expert_bytes)}  ({p.routed_experts / b:.2f} B; {_gib(plan.bytes_per_expert)} "
                           f"per expert over its {plan.num_moe_layers} MoE layers)"),
        ("vision", f"{_gib(plan.vision_bytes)}  ({p.vision / b:.2f} B: tower + projector)"),
        ("GPU", f"{_gib(plan.gpu_memory_bytes)} each, {_gib(plan.usable_bytes_per_gpu)} usable "
                f"({plan.headroom:.0%} headroom)"),
    ]
    if plan.num_expert_shards:
        rows.append(("expert shards", f"{plan.num_expert_shards} x 1 GPU, up to {plan.experts_per_shard} experts "
                                      f"= {_gib(plan.shard_bytes)} each"))
    else:
        rows.append(("expert shards", "none: experts colocated in each router-service replica"))
    rows += [
        ("router service", f"{plan.replicas} x 1 GPU, weights {_gib(plan.replica_bytes)} + KV cache "
                           f"{_gib(plan.kv_cache_bytes)} each"),
        ("KV per token", f"{plan.kv_bytes_per_token / 2**10:.0f} KiB {plan.kv_dtype} over {plan.num_layers} layers: "
                         f"{plan.num_full_layers} full-history ({plan.kv_bytes_per_token_full / 2**10:.0f} KiB) + "
                         f"{plan.num_chunked_layers} chunked ({plan.kv_bytes_per_token_chunked / 2**10:.0f} KiB)"),
        ("KV capacity", f"{plan.kv_tokens_per_replica:,} tokens per replica"
                        + (f"; {plan.kv_full_chunk_seqs} sequences at a full {plan.attention_chunk_size}-token chunk"
                           if plan.attention_chunk_size else "")),
        ("GPUs", f"{plan.num_gpus} needed, {plan.gpus} available"),
        ("fits", "yes" if plan.fits else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"warning: {w}" for w in plan.warnings]
    if plan.fits:
        lines.append("HerdConfig: " + json.dumps(plan.herd_config()))
    return "\n".join(lines)
