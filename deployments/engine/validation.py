"""Pydantic validation errors as one line for the client (the message of an InvalidInputError,
which the front ends answer with HTTP 400 / INVALID_ARGUMENT). Here, in the engine package, because
both `SamplingParams.create` and the OpenAI schema (deployments/openai_schema.py) use it and the
engine imports nothing from deployments/ outside it."""

from __future__ import annotations

from pydantic import ValidationError

from model.errors import InvalidInputError

MAX_INPUT_REPR = 40  # longer inputs are cut to 37 characters + "..."


def describe_validation_error(error: ValidationError) -> str:
    """One readable part per problem, joined by "; ": `field.path (got value): message`;
    `field.path: field required` for a missing field, `unknown field` as the message for one that is
    forbidden (extra="forbid"), the message alone for a problem with the whole object."""
    problems = []
    for err in error.errors(include_url=False):
        where = ".".join(map(str, err["loc"]))
        if err["type"] == "missing":
            problems.append(f"{where}: field required")
            continue
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        if where:
            got = repr(err["input"])
            got = got if len(got) <= MAX_INPUT_REPR else got[:MAX_INPUT_REPR - 3] + "..."
            problems.append(f"{where} (got {got}): {message}")
        else:
            problems.append(message)
    return "; ".join(problems)


def encodable(value: str) -> str:
    """`value` if it encodes as UTF-8, else ValueError (for pydantic validators). A JSON body can
    carry a lone surrogate (`"\\udcff"`), which Python decodes into a str that every later
    `.encode()` (hashing a tenant salt, a stop string, the wire) would fail on."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"is not valid Unicode text: {e.reason} at position {e.start}") from None
    return value


def check_encodable(field: str, value: str) -> str:
    """`value` if it encodes as UTF-8, else an InvalidInputError naming `field`."""
    try:
        return encodable(value)
    except ValueError as e:
        raise InvalidInputError(f"{field}: {e}") from None
