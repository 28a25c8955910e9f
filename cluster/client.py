"""gRPC client of `herd generate` and `herd chat`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from deployments.pb import herd_pb2 as pb
from deployments.pb import herd_pb2_grpc


class HerdClient:
    def __init__(self, address: str = "127.0.0.1:9000", timeout_s: float = 300.0):
        self.channel = grpc.insecure_channel(address)
        self.stub = herd_pb2_grpc.HerdStub(self.channel)
        self.timeout_s = timeout_s

    def generate(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        yield from self.stub.Generate(request, timeout=self.timeout_s)


def sampling(max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None) -> pb.SamplingParams:
    s = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    if seed is not None:
        s.seed = seed
    return s


def user_turn(text: str, images: list[str]) -> pb.ChatMessage:
    parts = [pb.ContentPart(image=Path(f).read_bytes()) for f in images] + [pb.ContentPart(text=text)]
    return pb.ChatMessage(role="user", content=parts)
