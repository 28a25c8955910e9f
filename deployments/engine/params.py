"""Per-request sampling parameters, validated once (bad values raise InvalidInputError)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model.errors import InvalidInputError

MAX_STOP_STRINGS = 16


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(256, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, description="softmax temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus: smallest set of tokens with this much mass")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 = off")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens below min_p x the top probability")
    seed: int | None = Field(None, ge=0, description="per-request seed: same seed, same tokens")
    stop: list[str] = Field(default_factory=list, description="strings that end generation (not returned)")
    stop_token_ids: list[int] = Field(default_factory=list, description="token ids that end generation")
    ignore_eos: bool = Field(False, description="keep going past end-of-sequence tokens")
    logprobs: bool = Field(False, description="return the log-probability of each chosen token")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_ids(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v):
            raise ValueError("stop token ids must be >= 0")
        return v

    @classmethod
    def create(cls, **kwargs) -> "SamplingParams":
        """Build from user input; errors become InvalidInputError naming the field."""
        if kwargs.get("top_k") == -1:
            kwargs["top_k"] = 0
        try:
            return cls(**kwargs)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'params'}: {err['msg']}" for err in e.errors())
            raise InvalidInputError(f"invalid sampling parameters: {problems}") from None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
