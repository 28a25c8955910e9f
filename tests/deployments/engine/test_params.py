"""SamplingParams: defaults, immutability, and validation errors that name the field."""

import pytest
from pydantic import ValidationError

from deployments.engine.params import MAX_STOP_STRINGS, SamplingParams
from model.errors import InvalidInputError


def test_defaults_match_the_openai_ones():
    p = SamplingParams.create()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (256, 1.0, 1.0, 0, 0.0, None)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == ([], [], False, False)
    assert not p.is_greedy
    assert SamplingParams.create(temperature=0).is_greedy
    assert not SamplingParams.create(temperature=0.01).is_greedy


def test_every_field_is_described():
    assert all(f.description for f in SamplingParams.model_fields.values())


def test_params_are_frozen():
    p = SamplingParams.create(max_tokens=3)
    with pytest.raises(ValidationError):
        p.max_tokens = 4  # type: ignore[misc]
    assert p.max_tokens == 3


def test_top_k_minus_one_means_off():
    assert SamplingParams.create(top_k=-1).top_k == 0
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams.create(top_k=5).top_k == 5


def test_valid_edges_are_accepted():
    p = SamplingParams.create(max_tokens=1, temperature=0.0, top_p=1.0, top_k=1, min_p=1.0, seed=0,
                              stop=["x"] * MAX_STOP_STRINGS, stop_token_ids=[0], ignore_eos=True, logprobs=True)
    assert p.top_k == 1 and len(p.stop) == MAX_STOP_STRINGS


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"seed": -3}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"bogus": 1}, "bogus"),
    ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": "not a list"}, "stop"),
    ({"stop_token_ids": [3, -1]}, "stop_token_ids"),
    ({"stop_token_ids": [3, 2**63]}, "stop_token_ids"),
    ({"top_k": 2**63}, "top_k"),
    ({"top_k": 2**31}, "top_k"),
    ({"max_tokens": 2**63}, "max_tokens"),
    ({"stop": ["ok", "\udcff"]}, "stop"),
])
def test_bad_params_raise_invalid_input_naming_the_field(kwargs, field):
    with pytest.raises(InvalidInputError, match=rf"\b{field}\b") as info:
        SamplingParams.create(**kwargs)
    assert isinstance(info.value, ValueError)  # InvalidInputError is a ValueError: front ends map it to 400


def test_messages_are_readable():
    with pytest.raises(InvalidInputError) as info:
        SamplingParams.create(max_tokens=-1, top_p=1.5, bogus=1)
    message = str(info.value)
    assert message.startswith("invalid sampling parameters: ")
    assert "max_tokens (got -1): Input should be greater than or equal to 1" in message
    assert "top_p (got 1.5): Input should be less than or equal to 1" in message
    assert "bogus (got 1): unknown field" in message
    with pytest.raises(InvalidInputError, match=r"stop \(got .*\): at most 16 stop strings, got 17"):
        SamplingParams.create(stop=["x"] * 17)
