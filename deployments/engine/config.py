"""Engine configuration: validated once, immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.errors import check_known
from model.expert_kernel import KERNEL_CHOICES


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    block_size: int = Field(16, ge=1, description="tokens per KV block")
    max_num_seqs: int = Field(64, ge=1, description="sequences running at once (decode batch size)")
    max_num_batched_tokens: int = Field(
        1024, ge=1, description="token budget of one step: decode tokens first, then prefill chunks"
    )
    max_model_len: int | None = Field(
        None, ge=2, description="longest prompt + output; default: the model's limit, capped by the KV cache"
    )
    max_waiting: int = Field(4096, ge=0, description="queued requests beyond which new ones are refused at once "
                             "(EngineOverloaded: HTTP 429 / RESOURCE_EXHAUSTED). Served (HerdConfig), the default is "
                             "128 and it must stay below router_service.max_ongoing_requests so that the refusal "
                             "is reachable; 4096 here leaves room for offline batches")
    kv_cache_bytes: int = Field(256 * 2**20, ge=1, description="memory for the paged KV cache (all layers)")
    num_blocks_full: int | None = Field(None, ge=1, description="override: KV blocks of the NoPE (full-history) layers")
    num_blocks_chunked: int | None = Field(None, ge=1, description="override: KV blocks of the chunked RoPE layers")
    enable_prefix_caching: bool = Field(True, description="reuse the KV of identical prompt prefixes")
    stuck_after_s: float = Field(
        120.0, gt=0, description="the router service's health check fails when requests are unfinished and no engine "
        "step made progress for this long (Serve then replaces the replica); above the longest expected step"
    )
    expert_wait_s: float = Field(
        30.0, ge=0, description="while the expert backend cannot begin a step (its group re-forms, a shard restarts), "
        "waiting and new requests keep their places this long before they fail with UNAVAILABLE (the requests of the "
        "step that was running when it failed fail at once)"
    )
    attention_backend: str = Field(
        "reference", description="attention over the paged KV cache (deployments/engine/attention/registry.py): "
        "reference (SDPA per sequence), flex (compiled flex_attention, one call per layer) or auto (flex on CUDA)"
    )
    compile: bool | None = Field(
        None, description="torch.compile the step (deployments/engine/compile.py); None: on for CUDA, off on the CPU"
    )
    cuda_graphs: bool | None = Field(
        None, description="capture decode steps as CUDA graphs per padded batch size (needs compile and backends "
        "that trace: flex attention, grouped experts); None: on for CUDA"
    )

    expert_kernel: str = Field(
        "auto", description="the routed experts' kernel (model/expert_kernel.py): reference | grouped | auto (grouped "
        "on CUDA, reference elsewhere); applies to colocated experts and to every expert shard"
    )

    @field_validator("expert_kernel")
    @classmethod
    def _known_kernel(cls, name: str) -> str:
        return check_known("expert kernel", name, KERNEL_CHOICES)

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        from deployments.engine.attention.registry import ATTENTION_BACKENDS, AUTO

        return check_known("attention backend", name, [*ATTENTION_BACKENDS, AUTO])
