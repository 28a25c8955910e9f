"""Per-request sampling parameters: validated once, immutable, passed down to the sampler and the
stop checker. Front ends build them with `SamplingParams.create(**user_input)`, which turns every
validation problem into one `InvalidInputError` that names the offending fields."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deployments.engine.validation import describe_validation_error, encodable
from model.errors import InvalidInputError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024  # longer stop strings are refused (matching is linear anyway)
MAX_SEED = 2**63 - 1  # the gRPC field is int64; torch.Generator.manual_seed takes it as is
# Integer bounds (the gRPC fields are int32): anything the sampler, the stop checker or a torch
# tensor holds must fit, so an absurd value is a 400 here rather than an overflow inside a step.
# A top_k above the vocabulary size keeps every token (the sampler clamps it to the vocabulary).
MAX_INT32 = 2**31 - 1
GREEDY_TEMPERATURE = 1e-5  # below this, logits / temperature overflows fp32: sample greedily (as vLLM)


class SamplingParams(BaseModel):
    """How one request picks its tokens and when it stops (OpenAI / vLLM meanings)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    max_tokens: int = Field(256, ge=1, le=MAX_INT32, description="Most tokens to generate (the stop token counts).")
    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature; 0 means greedy (argmax).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus: keep the smallest set of most likely "
                         "tokens whose probability adds up to at least top_p (after top_k); 1 = off.")
    top_k: int = Field(0, ge=0, le=MAX_INT32, description="Keep only the k most likely tokens; 0 (or -1 on input) "
                       "= off; above the vocabulary size = all.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens whose probability is below "
                         "min_p times the top token's probability; 0 = off.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Per-request seed: the same seed gives "
                             "the same tokens whatever else is in the batch; None = shared RNG.")
    stop: list[str] = Field(default_factory=list, description=f"Up to {MAX_STOP_STRINGS} non-empty strings "
                            f"of at most {MAX_STOP_STRING_CHARS} characters "
                            "that end generation; the returned text ends before the stop string.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Token ids that end generation "
                                      "(even with ignore_eos); kept in the token ids, not in the text.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens.")
    logprobs: bool = Field(False, description="Return the log-probability of each chosen token under the "
                           "unmodified model distribution (log_softmax of the raw logits, as vLLM).")

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k_off(cls, v: Any) -> Any:
        """-1 is the OpenAI / vLLM spelling of "off"; store it as 0. Other negatives are errors."""
        if isinstance(v, int) and not isinstance(v, bool) and v < 0:
            if v != -1:
                raise ValueError("must be -1 or 0 (off), or at least 1")
            return 0
        return v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: list[str]) -> list[str]:
        """At most MAX_STOP_STRINGS, none empty (an empty string would match at once)."""
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(v)}")
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        longest = max((len(s) for s in v), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise ValueError(f"a stop string may have at most {MAX_STOP_STRING_CHARS} characters, got one of {longest}")
        for s in v:
            encodable(s)
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_ids(cls, v: list[int]) -> list[int]:
        """Token ids are non-negative (the vocabulary bound is checked by the engine)."""
        if any(t < 0 for t in v):
            raise ValueError(f"token ids must be >= 0, got {min(v)}")
        if any(t > MAX_INT32 for t in v):
            raise ValueError(f"token ids must be <= {MAX_INT32}, got {max(v)}")
        return v

    @classmethod
    def create(cls, **kwargs: Any) -> SamplingParams:
        """Build from user input; any validation error becomes one InvalidInputError naming the fields."""
        try:
            return cls(**kwargs)
        except ValidationError as e:
            raise InvalidInputError(f"invalid sampling parameters: {describe_validation_error(e)}") from None

    @property
    def is_greedy(self) -> bool:
        """True when the sampler takes the argmax (temperature 0, or too small to divide by)."""
        return self.temperature < GREEDY_TEMPERATURE
