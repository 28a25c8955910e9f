"""describe_validation_error: the one-line message both SamplingParams.create and the OpenAI schema
put in their HTTP 400 / INVALID_ARGUMENT answers."""

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from deployments.engine.validation import describe_validation_error


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = 0

    @field_validator("n")
    @classmethod
    def _small(cls, v: int) -> int:
        if v > 9:
            raise ValueError("must be at most 9")
        return v


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    inner: list[Inner] = []
    text: str = ""

    @model_validator(mode="after")
    def _not_both(self):
        if self.name == "both" and self.inner:
            raise ValueError("name 'both' takes no inner")
        return self


def message(body) -> str:
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(body)
    return describe_validation_error(info.value)


def test_missing_unknown_and_nested_fields():
    assert message({"bogus": 1}) == "name: field required; bogus (got 1): unknown field"
    assert message({"name": "a", "inner": [{"n": 1}, {"n": 12}]}) == "inner.1.n (got 12): must be at most 9"


def test_long_inputs_are_cut_and_whole_object_problems_are_the_message_alone():
    assert message({"name": "a", "text": 5}) == "text (got 5): Input should be a valid string"
    long = message({"name": "a", "inner": "x" * 100})
    assert long == f"inner (got {repr('x' * 100)[:37]}...): Input should be a valid list"
    assert message({"name": "both", "inner": [{}]}) == "name 'both' takes no inner"
