"""Conversions between the gRPC messages (`proto/herd/v1/herd.proto`) and Herd's request types."""

from __future__ import annotations

import uuid
from dataclasses import replace

from deployments.engine.output import RequestOutput
from deployments.engine.params import SamplingParams
from deployments.engine.validation import check_encodable
from deployments.pb import herd_pb2 as pb
from deployments.request import ChatTurn, GenerationRequest, ImagePart
from model.errors import InvalidInputError

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed")


def sampling_from_pb(s: pb.SamplingParams) -> SamplingParams:
    kwargs = {name: getattr(s, name) for name in _OPTIONAL if s.HasField(name)}
    kwargs.update(stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                  logprobs=s.logprobs)
    return SamplingParams.create(**kwargs)


def request_from_pb(r: pb.GenerateRequest) -> GenerationRequest:
    kind = r.WhichOneof("prompt")
    if kind is None:
        raise InvalidInputError("the request has no prompt: set text, chat or prompt_token_ids")
    for name in ("request_id", "session_id", "tenant", "model"):  # protobuf checks UTF-8 on the wire; be sure
        check_encodable(name, getattr(r, name))
    # request_id is the client's label for its request, echoed back; the Ingress keys the engine's
    # request with an id of its own, so equal ids from different calls never collide.
    common = dict(request_id=r.request_id or f"grpc-{uuid.uuid4().hex}", params=sampling_from_pb(r.sampling),
                  model=r.model, session_id=r.session_id, tenant=r.tenant)
    if kind == "text":
        check_encodable("text", r.text)
        return GenerationRequest(text=r.text, **common)
    if kind == "prompt_token_ids":
        return GenerationRequest(prompt_token_ids=list(r.prompt_token_ids.ids), **common)
    turns = [ChatTurn(m.role, [ImagePart(p.image) if p.WhichOneof("part") == "image" else p.text for p in m.content])
             for m in r.chat.messages]
    return GenerationRequest(messages=turns, **common)


def response_from_output(d: RequestOutput) -> pb.GenerateResponse:
    out = pb.GenerateResponse(request_id=d.request_id, token_ids=d.token_ids, text=d.text,
                              logprobs=d.logprobs or [], finish_reason=d.finish_reason or "")
    if d.finish_reason:
        out.usage.CopyFrom(pb.Usage(prompt_tokens=d.num_prompt_tokens, completion_tokens=d.num_generated_tokens,
                                    cached_tokens=d.num_cached_tokens, cached_tokens_shared=d.num_cached_tokens_shared,
                                    replica=d.replica))
    return out


def join_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """The whole completion as one output (the unary RPC, non-streaming HTTP)."""
    logprobs = [lp for d in outputs for lp in (d.logprobs or [])] or None
    return replace(outputs[-1], token_ids=[t for d in outputs for t in d.token_ids],
                   text="".join(d.text for d in outputs), logprobs=logprobs)
