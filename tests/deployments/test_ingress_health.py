"""`GET /health` of the Ingress without Ray: 200 when the router service answers, 503 with an
OpenAI-style error body when it fails or does not answer in time (never a 500, never a hang).
With a real cluster: tests/cluster/test_serving.py."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from deployments import ingress


class Response:
    """What `handle.stats.remote()` returns: awaitable, cancellable."""

    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def __await__(self):
        if self.outcome == "hang":
            yield from asyncio.sleep(3600).__await__()
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def cancel(self):
        self.cancelled = True


class Handle:
    def __init__(self, outcome):
        self.response = Response(outcome)
        self.stats = self

    def remote(self):
        return self.response


def health(outcome, timeout_s: float = 5) -> tuple[int, dict, Response]:
    replica = SimpleNamespace(router_service=Handle(outcome), health_timeout_s=timeout_s)  # no model, no Ray
    r = asyncio.run(ingress.Ingress.func_or_class.health(replica))
    return r.status_code, json.loads(r.body), replica.router_service.response


def test_200_when_the_router_service_answers():
    assert health({"running": 0})[:2] == (200, {"status": "ok"})


@pytest.mark.parametrize("outcome, fragment", [
    (RuntimeError("replica died\nmore lines"), "the router service is unavailable: RuntimeError: replica died"),
    ("hang", "no router service replica answered within 0.2 s"),
])
def test_503_when_it_does_not(outcome, fragment):
    status, body, response = health(outcome, timeout_s=0.2)
    assert status == 503 and body["error"]["message"] == fragment and body["error"]["code"] == 503
    assert response.cancelled
