"""gRPC helpers the cluster tests share: a stub on the served app, and a stream consumed in the
background (its responses, or the error it ended with)."""

from __future__ import annotations

import threading

import grpc

from deployments.pb import herd_pb2_grpc


def stub(served) -> herd_pb2_grpc.HerdStub:
    return herd_pb2_grpc.HerdStub(grpc.insecure_channel(served.grpc))


class Stream(threading.Thread):
    """A gRPC `Generate` stream consumed in the background: its responses, or the error it ended with."""

    def __init__(self, served, request, timeout_s: float = 120):
        super().__init__(daemon=True)
        self.served, self.request, self.timeout_s = served, request, timeout_s
        self.responses, self.error, self.started = [], None, threading.Event()

    def run(self):
        try:
            for r in stub(self.served).Generate(self.request, timeout=self.timeout_s):
                self.responses.append(r)
                self.started.set()
        except grpc.RpcError as e:
            self.error = e
        self.started.set()

    def tokens(self) -> list[int]:
        return [t for r in self.responses for t in r.token_ids]
