"""API keys and tenancy on a real Serve app (real gRPC, httpx and `openai` clients, a real
redis-server as the shared tier): requests without a valid key are refused while another stream
goes on intact, keys added or revoked in the key file take effect without a redeploy, no header
or field opens another tenant's prefix cache, and anonymous requests (auth off) share no cache
hits in either tier unless the operator opts in."""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import openai
import pytest

from deployments.auth import add_key, revoke_key
from deployments.pb import herd_pb2 as pb
from tests.cluster.grpc_client import stub

CHUNK = 16


def document(seed: int) -> list[int]:
    """Four chunks: each test asks about documents of its own."""
    return [1] + [(i * 7 + seed * 31) % 200 + 20 for i in range(4 * CHUNK)]


DOC = document(0)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "keys.json"
    made = {tenant: add_key(path, tenant)[0] for tenant in ("acme", "globex")}
    made["admin"] = add_key(path, "ops", admin=True)[0]
    return path, made


def deploy(served, redis_server, **auth) -> None:
    redis_server.client().flushall()
    served.deploy(auth=auth, redis={"url": redis_server.url, "chunk_tokens": CHUNK, "fetch_policy": "always"})


@pytest.fixture(scope="module")
def app(served, redis_server, keys):
    deploy(served, redis_server, keys_file=str(keys[0]))
    return served


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def ask(served, ids: list[int], key: str | None = None, tenant: str = "") -> pb.GenerateResponse:
    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), tenant=tenant,
                                 sampling=pb.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    return stub(served).GenerateUnary(request, timeout=60, metadata=bearer(key) if key else None)


def wait_for_chunks(redis_server, at_least: int = 4, timeout_s: float = 20) -> None:
    """A document's chunks are in Redis (written back in the background)."""
    deadline = time.monotonic() + timeout_s
    while len(redis_server.client().keys("herd:kv:*")) < at_least:
        assert time.monotonic() < deadline, "the document's chunks never reached Redis"
        time.sleep(0.1)


def grpc_code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def grpc_calls(served, metadata) -> list:
    """Each RPC that needs a key, sent with `metadata`."""
    herd, request = stub(served), pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=4))
    return [lambda: list(herd.Generate(request, timeout=60, metadata=metadata)),
            lambda: herd.GenerateUnary(request, timeout=60, metadata=metadata),
            lambda: herd.ListModels(pb.ListModelsRequest(), timeout=60, metadata=metadata)]


class Victim(threading.Thread):
    """A streaming request with a valid key, consumed in the background."""

    def __init__(self, served, key: str):
        super().__init__(daemon=True)
        self.served, self.key = served, key
        self.tokens: list[int] = []
        self.finish, self.error, self.started = "", None, threading.Event()

    def run(self):
        request = pb.GenerateRequest(text="tell me a long story",
                                     sampling=pb.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        try:
            for r in stub(self.served).Generate(request, timeout=90, metadata=bearer(self.key)):
                self.tokens += r.token_ids
                self.finish = r.finish_reason or self.finish
                self.started.set()
        except grpc.RpcError as e:
            self.error = e
        self.started.set()


def test_requests_without_a_valid_key_are_refused_while_another_stream_goes_on(app, keys):
    path, made = keys
    alone = Victim(app, made["acme"])
    alone.run()
    assert alone.error is None and alone.finish == "length"
    doomed, record = add_key(path, "acme")  # a key added now works at once (the file is re-read)...
    assert ask(app, [1, 2, 3], doomed).usage.prompt_tokens == 3
    revoke_key(path, record.id)  # ...and a revoked one is refused at once

    victim = Victim(app, made["acme"])
    victim.start()
    assert victim.started.wait(60)
    body = {"model": "", "prompt": "hi", "max_tokens": 4}
    for headers, problem in (({}, "missing API key"), ({"authorization": "Bearer nope"}, "invalid API key"),
                             ({"authorization": f"Bearer {doomed}"}, "invalid API key"),
                             ({"authorization": f"Basic {made['acme']}"}, "missing API key")):
        for method, route in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            r = httpx.request(method, app.http + route, json=body, headers=headers, timeout=60)
            assert r.status_code == 401, (route, headers, r.text)
            assert r.json()["error"]["message"].startswith(problem) and r.headers["www-authenticate"] == "Bearer"
    for metadata, problem in ((None, "missing API key"), (bearer("herd_0123456789ab_" + "x" * 43), "invalid API key"),
                              (bearer(doomed), "invalid API key")):
        for call in grpc_calls(app, metadata):
            code, details = grpc_code(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith(problem), details
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        openai.OpenAI(base_url=app.http + "/v1", api_key=doomed).models.list()
    victim.join(90)
    assert victim.error is None, victim.error.details()
    assert victim.tokens == alone.tokens and victim.finish == "length"
    assert httpx.get(app.http + "/health", timeout=60).status_code == 200  # probes need no key
    client = openai.OpenAI(base_url=app.http + "/v1", api_key=made["globex"])
    assert client.completions.create(model=client.models.list().data[0].id, prompt="hi", max_tokens=2).usage


def test_no_header_or_field_opens_another_tenants_cache(app, keys, redis_server):
    """acme asks about a fresh document first (its chunks reach both tiers); globex then asks about the
    same document, naming acme every way a request can: no cached token, or a 403."""
    _, made = keys
    globex = {"authorization": f"Bearer {made['globex']}"}
    http = {"model": "", "max_tokens": 2, "ignore_eos": True}
    attacks = [
        lambda doc: ask(app, doc + [9], made["globex"]).usage.cached_tokens,
        lambda doc: httpx.post(app.http + "/v1/completions", json=http | {"prompt": doc + [9], "user": "acme"},
                               headers=globex, timeout=60).json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        lambda doc: httpx.post(app.http + "/v1/completions", json=http | {"prompt": doc + [9], "user": "tenant:acme"},
                               headers=globex, timeout=60).json()["usage"]["prompt_tokens_details"]["cached_tokens"],
    ]
    for seed, attack in enumerate(attacks, start=1):
        doc = document(seed)
        assert ask(app, doc + [5], made["acme"]).usage.cached_tokens == 0
        wait_for_chunks(redis_server, at_least=4 * seed)
        assert attack(doc) == 0, seed
        assert ask(app, doc + [6], made["acme"]).usage.cached_tokens >= 4 * CHUNK  # acme's own hit is there
    code, details = grpc_code(lambda: ask(app, DOC + [8], made["globex"], tenant="acme"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "tenant 'acme'" in details and "'globex'" in details
    r = httpx.post(app.http + "/v1/completions", json=http | {"prompt": DOC},
                   headers=globex | {"x-herd-tenant": "acme"}, timeout=60)
    assert r.status_code == 403 and "x-herd-tenant names tenant 'acme'" in r.json()["error"]["message"], r.text
    chat = http | {"user": "acme", "messages": [{"role": "user", "content": "hello " * 40}]}
    for key in ("acme", "globex"):  # chat too: acme's prompt first, then globex's identical one
        r = httpx.post(app.http + "/v1/chat/completions", json=chat,
                       headers={"authorization": f"Bearer {made[key]}"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, r.text
    # the admin key may act for a tenant it names
    assert ask(app, document(1) + [10], made["admin"], tenant="acme").usage.cached_tokens >= 4 * CHUNK


@pytest.mark.parametrize("shared", [False, True])
def test_anonymous_requests_share_hits_only_when_the_operator_opts_in(served, redis_server, shared):
    deploy(served, redis_server, enabled=False, shared_anonymous_cache=shared)
    assert ask(served, DOC + [5]).usage.cached_tokens == 0
    if shared:
        wait_for_chunks(redis_server)
    else:  # a named tenant's chunks, written after the anonymous ones (one writer, in order), are all there is
        assert ask(served, document(9) + [5], tenant="named").usage.cached_tokens == 0
        wait_for_chunks(redis_server)
        assert len(redis_server.client().keys("herd:kv:*")) == 4
    cached = [ask(served, DOC + [6 + n]).usage.cached_tokens for n in range(2)]  # local tier, and Redis
    assert cached == ([4 * CHUNK] * 2 if shared else [0, 0]), cached
