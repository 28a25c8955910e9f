"""Bad input on both APIs gets INVALID_ARGUMENT / HTTP 4xx with a message and never hurts a
replica. Two router-service replicas and two expert shards form one expert group (collective
transport, sockets): concurrent requests on both replicas give the colocated tokens and the shards run
union batches; a shard killed mid-step fails that step's requests with UNAVAILABLE within 5 s (killed
between steps, the requests wait for it), restarts, the group re-forms and later requests give the
colocated tokens again; a killed
router-service replica leaves the group and the other keeps serving."""

import base64
import json
import os
import threading
import time

import grpc
import httpx
import pytest
import ray

from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from deployments.pb import herd_pb2 as pb
from deployments.process_env import SHARED_CORES_ENV
from tests.cluster.grpc_client import Stream, stub

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def grpc_error(served, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub(served).Generate(request, timeout=60))
    return info.value


@pytest.fixture(scope="module")
def sharded(served):
    # at most 4 requests per replica: 8 at once must use both (and the shards see both replicas' rows)
    # (engine.max_waiting must stay below max_ongoing_requests: a burst of 4 may see one refused, retried)
    # (engine.expert_wait_s: a request sent while a shard restarts waits for it, however loaded the machine)
    served.deploy(router_service={"num_replicas": 2, "max_ongoing_requests": 4},
                  engine={"max_waiting": 3, "expert_wait_s": 60},
                  experts={"mode": "sharded", "num_shards": 2, "transport": "collective"})
    return served


def pool():
    from deployments.expert_shard import NAMESPACE, POOL_NAME

    return ray.get_actor(POOL_NAME, namespace=NAMESPACE)


def generate_concurrently(served, offline, seeds) -> tuple[dict, dict]:
    """Greedy requests all at once (spread over the replicas); their tokens and the offline engine's."""
    want, got = {}, {}

    def one(seed):
        ids = [offline.tokenizer.bos_id] + [(seed * 37 + i * 11) % 500 + 3 for i in range(20)]
        req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), session_id=f"s{seed}",
                                 sampling=pb.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        deadline = time.monotonic() + 60
        while True:
            try:
                got[seed] = [t for c in stub(served).Generate(req, timeout=90) for t in c.token_ids]
                return
            except grpc.RpcError as e:  # a burst at a full replica: the engine's fast refusal; retry, as clients do
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in seeds]
    for t in threads:
        t.start()
    for seed in seeds:
        ids = [offline.tokenizer.bos_id] + [(seed * 37 + i * 11) % 500 + 3 for i in range(20)]
        want[seed] = offline.generate([ids], GREEDY)[0].token_ids
    for t in threads:
        t.join(120)
    return got, want


def test_two_routers_two_shards_equal_colocated(sharded, checkpoint):
    offline = Engine.from_pretrained(checkpoint)
    got, want = generate_concurrently(sharded, offline, range(8))
    assert got == want
    stats = ray.get(pool().shard_stats.remote())
    assert all(s["union_calls"] > 0 and s["max_replicas"] == 2 for s in stats), stats  # both replicas' rows at once
    assert len(ray.get(pool().group.remote())["replicas"]) == 2
    # exported through ray.util.metrics: the shards' union batches, every member's group generation
    assert sharded.metric("ray_herd_expert_union_calls_total") > 0
    # (a replica's gauge is exported from start-up, 0 until it has joined: wait for the joined value)
    deadline = time.monotonic() + 40
    while (generations := sharded.metric("ray_herd_expert_group_generation", 'member="replica"')) < 2 \
            and time.monotonic() < deadline:
        time.sleep(1)
    assert generations >= 2  # two replicas, each >= 1
    # the replicas (like the shards) run with the OpenMP settings of a sharded deployment
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::herd#RouterService#")]
    envs = ray.get([ray.get_actor(n, namespace="serve").__ray_call__.remote(lambda _: dict(os.environ)) for n in names])
    assert len(envs) == 2 and all(env.get(k) == v for env in envs for k, v in SHARED_CORES_ENV.items())


@pytest.mark.parametrize("request_kwargs, fragment", [
    (dict(text=""), "empty"),
    (dict(), "no prompt"),
    (dict(model="gpt-9", text="hi"), "not served"),
    (dict(text="hi", sampling=pb.SamplingParams(max_tokens=-5)), "max_tokens"),
    (dict(prompt_token_ids=pb.TokenIds(ids=[1, 99999999])), "outside the vocabulary"),
    (dict(prompt_token_ids=pb.TokenIds(ids=[i % 2000 + 3 for i in range(5000)])), "too long"),
    (dict(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=[
        pb.ContentPart(image=b"not an image"), pb.ContentPart(text="hi")])])), "image"),
    (dict(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content=[pb.ContentPart(text="x")])])), "role"),
])
def test_grpc_bad_input(sharded, request_kwargs, fragment):
    err = grpc_error(sharded, pb.GenerateRequest(**request_kwargs))
    expected = grpc.StatusCode.NOT_FOUND if fragment == "not served" else grpc.StatusCode.INVALID_ARGUMENT
    assert err.code() == expected, err.details()
    assert fragment in err.details()


def _chat(content, **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


@pytest.mark.parametrize("body, status", [
    (_chat("hi", max_tokens=-1), 400),
    (_chat("hi", model="nope"), 404),
    (_chat([{"type": "image_url",
             "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"junk").decode()}}]), 400),
    (_chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]), 400),
    ({"messages": "hello"}, 400),
    (_chat("hi", temperature="hot"), 400),
    ({"prompt": [i % 2000 + 3 for i in range(5000)], "max_tokens": 1}, 400),
])
def test_http_bad_input(sharded, body, status):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = httpx.post(sharded.http + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_http_not_json(sharded):
    r = httpx.post(sharded.http + "/v1/chat/completions", content=b"{nope", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_still_healthy_after_bad_input(sharded):
    r = httpx.post(sharded.http + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_killed_shard_fails_fast_then_recovers(sharded):
    shard, _ = ray.get(pool().shards_and_ranges.remote())[0]
    long = pb.GenerateRequest(text="tell me a long story", sampling=pb.SamplingParams(
        max_tokens=2000, temperature=0, ignore_eos=True))
    errors, finished, started = [], [], threading.Event()

    def consume():
        try:
            for update in stub(sharded).Generate(long, timeout=120):
                started.set()
                if update.finish_reason:
                    finished.append(update.finish_reason)
        except grpc.RpcError as e:
            errors.append((e, time.perf_counter()))

    thread = threading.Thread(target=consume)
    thread.start()
    assert started.wait(60)
    pid = ray.get(shard.info.remote())["pid"]  # same machine
    generation = ray.get(pool().group.remote())["generation"]  # before the kill: the replicas re-join at once
    ray.kill(shard, no_restart=False)
    while True:  # the time of death (ray.kill reaches the process late on a loaded machine)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    killed = time.perf_counter()
    thread.join(120)
    assert not thread.is_alive(), "the stream hung on the dead shard"
    # The kill caught the step in flight (almost always): the stream fails at once with UNAVAILABLE.
    # Or it came between two steps: nothing of the next had run, so the engine kept the request,
    # waited for the restarted shard (engine.expert_wait_s) and the stream ran to its end.
    if errors:
        err, when = errors[0]
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert when - killed < 5
    else:
        assert finished == ["length"], finished
    # sent while the shard restarts (reloading its experts): it waits for the re-formed group
    # (engine.expert_wait_s) instead of failing, then completes
    ok = list(stub(sharded).Generate(pb.GenerateRequest(text="again", sampling=pb.SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True)), timeout=100))
    assert ok[-1].finish_reason == "length"
    assert ray.get(pool().group.remote())["generation"] > generation  # re-formed with the restarted shard
    offline = Engine.from_pretrained(sharded.model_dir)
    got, want = generate_concurrently(sharded, offline, range(20, 24))
    assert got == want


def test_killed_router_replica_leaves_the_group_and_the_other_serves(sharded, checkpoint):
    """Last of the expert-group tests: one router-service replica killed; the group re-forms without
    it (its sockets closed), the other replica serves the colocated tokens, Serve starts a new one."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::herd#RouterService#")]
    assert len(names) == 2
    victim = names[0].rsplit("#", 1)[1]
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    offline = Engine.from_pretrained(checkpoint)
    deadline = time.time() + 120
    while True:
        try:
            got, want = generate_concurrently(sharded, offline, [40])
            if got == want:
                break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
        assert time.time() < deadline, "no replica served within 120 s of the kill"
        time.sleep(1)
    assert victim not in ray.get(pool().group.remote())["replicas"]
    got, want = generate_concurrently(sharded, offline, range(41, 45))
    assert got == want


HOSTILE_BODIES = [
    b'{"messages": [{"role": "user", "content": "\xff"}], "max_tokens": 2}',
    b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
    b'{"messages": [{"role": "user", "content": "a\\ud800"}], "max_tokens": 2}',
    b'{"prompt": "x\\udc00", "max_tokens": 2}',
    b'{"prompt": [1, 9223372036854775808], "max_tokens": 2}',
]


def test_hostile_bodies_get_400_and_leave_a_running_stream_intact(sharded):
    """Each hostile body gets a 400 naming its problem (these were 500s), while a stream runs beside
    them and ends with every token, the same as when run alone."""
    stream_body = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                   "stream": True}
    result: dict = {}

    def victim():
        with httpx.stream("POST", sharded.http + "/v1/completions", json=stream_body, timeout=120) as r:
            result["events"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    thread = threading.Thread(target=victim)
    thread.start()
    for raw in HOSTILE_BODIES:
        path = "/v1/completions" if raw.startswith(b'{"prompt"') else "/v1/chat/completions"
        r = httpx.post(sharded.http + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400, (raw[:60], r.text)
        message = r.json()["error"]["message"]
        assert message and "internal" not in message and "Exceeds the limit" not in message, message
    thread.join(120)
    events = result["events"]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    alone = httpx.post(sharded.http + "/v1/completions", json=stream_body | {"stream": False}, timeout=120).json()
    assert alone["choices"][0]["text"] == text and alone["usage"]["completion_tokens"] == 48


def test_a_killed_expert_pool_is_recreated(sharded):
    """The pool actor itself killed (its shards die with it): requests fail with UNAVAILABLE, the
    router service creates a new pool, and requests succeed again."""
    from deployments.expert_shard import NAMESPACE, POOL_NAME

    ray.kill(ray.get_actor(POOL_NAME, namespace=NAMESPACE), no_restart=True)
    request = pb.GenerateRequest(text="again", sampling=pb.SamplingParams(max_tokens=4, temperature=0,
                                                                          ignore_eos=True))
    deadline = time.time() + 120
    while True:
        try:
            ok = list(stub(sharded).Generate(request, timeout=100))  # waits for the new pool (expert_wait_s)
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            assert time.time() < deadline, "no new expert pool within 120 s"
            time.sleep(1)
    assert ok[-1].finish_reason == "length"
    assert ray.get_actor(POOL_NAME, namespace=NAMESPACE)  # a new pool under the same name


# ---- hostile values fail alone ---------------------------------------------------------------
SESSION = "victim-session"  # the attack names the victim's session: prefix affinity sends both to one replica


def _victim_request(request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(text="tell me a long story", session_id=SESSION, request_id=request_id,
                              sampling=pb.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))


@pytest.fixture(scope="module")
def victim_alone(sharded):
    return [t for r in stub(sharded).Generate(_victim_request(), timeout=60) for t in r.token_ids]


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "user": "\udcff"}, "user"),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**63}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\udcff"]}, "stop"),
    ("/v1/completions", {"prompt": "hi\udcff"}, "prompt"),
])
def test_hostile_values_get_400_and_never_hurt_another_stream(sharded, victim_alone, path, body, field):
    victim = Stream(sharded, _victim_request(), timeout_s=90)
    victim.start()
    assert victim.started.wait(60)
    raw = json.dumps({**body, "max_tokens": 8, "session_id": SESSION})  # ASCII: the surrogate stays an escape
    r = httpx.post(sharded.http + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]
    victim.join(90)
    assert victim.error is None, victim.error.details()
    assert victim.tokens() == victim_alone
    assert victim.responses[-1].finish_reason == "length"


def test_equal_client_request_ids_never_collide(sharded, victim_alone):
    """Clients numbering their requests "1", "2", ... reuse each other's ids: both requests run and
    each echoes its id (the engine keys them with ids of its own)."""
    first = Stream(sharded, _victim_request(request_id="1"), timeout_s=90)
    first.start()
    assert first.started.wait(60)
    second = list(stub(sharded).Generate(_victim_request(request_id="1"), timeout=60))
    first.join(90)
    assert first.error is None, first.error.details()
    for responses in (first.responses, second):
        assert [t for r in responses for t in r.token_ids] == victim_alone
        assert {r.request_id for r in responses} == {"1"}
        assert responses[-1].finish_reason == "length"
