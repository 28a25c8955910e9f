"""gRPC client of `herd generate` and `herd chat`. gRPC errors leave it as `cluster.errors`
exceptions with a message a user can act on: `ClusterUnreachable` when nothing (or no herd
application) answers at the address, `RequestFailed` with the server's message otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from cluster.errors import CliError, ClusterUnreachable, RequestFailed
from deployments.pb import herd_pb2 as pb
from deployments.pb import herd_pb2_grpc

# What gRPC itself says (not the server) when it cannot reach the address or loses the connection.
CONNECTION_FAILURES = ("failed to connect", "connection refused", "dns resolution failed", "socket closed",
                       "connection reset", "connections to all backends failing", "name resolution")
# What Ray Serve's gRPC proxy says when it runs no application (`herd down` removed it, or another one runs).
NO_APPLICATION = ("application metadata not set", "ping /ray.serve.rayserveapiservice/listapplications")


def translate(error: grpc.RpcError, address: str, timeout_s: float | None = None) -> CliError:
    """The CLI error for a failed call to `address`."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = (error.details() if callable(getattr(error, "details", None)) else None) or ""
    lowered = details.lower()
    if code == grpc.StatusCode.UNAVAILABLE and any(s in lowered for s in CONNECTION_FAILURES):
        return ClusterUnreachable(f"no herd cluster answers at {address}: start one with `herd up` "
                                  "(or pass --address)")
    if code == grpc.StatusCode.NOT_FOUND and any(s in lowered for s in NO_APPLICATION):
        return ClusterUnreachable(f"Ray Serve at {address} runs no herd application: deploy it with `herd up` "
                                  "(or pass --address)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {timeout_s:g} s" if timeout_s else ""
        return RequestFailed(f"no answer from {address}{within}: the cluster is busy or stuck "
                             "(`herd status` shows its state)", code.name)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return RequestFailed(f"{details.strip()} ({address}: pass --api-key or set HERD_API_KEY)", code.name)
    name = code.name if code is not None else "UNKNOWN"
    return RequestFailed(details.strip() or f"the request failed with gRPC status {name}", name)


class HerdClient:
    def __init__(self, address: str = "127.0.0.1:9000", timeout_s: float = 300.0, api_key: str | None = None):
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = herd_pb2_grpc.HerdStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []

    def generate(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        try:
            yield from self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as e:
            raise translate(e, self.address, self.timeout_s) from e

    def list_models(self, timeout_s: float = 30.0) -> list[pb.ModelInfo]:
        """The served models: a cheap call that fails fast when nothing answers."""
        try:
            return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s, metadata=self.metadata).models)
        except grpc.RpcError as e:
            raise translate(e, self.address, timeout_s) from e


def sampling(max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None) -> pb.SamplingParams:
    s = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    if seed is not None:
        s.seed = seed
    return s


def user_turn(text: str, images: list[str]) -> pb.ChatMessage:
    parts = [pb.ContentPart(image=Path(f).read_bytes()) for f in images] + [pb.ContentPart(text=text)]
    return pb.ChatMessage(role="user", content=parts)
