"""Who may reach what, read off the rendered NetworkPolicies with Kubernetes' semantics: clients
reach only the Serve ports; Ray's ports only the release's Ray pods (the dashboard also the KubeRay
operator); Redis only the release's Ray pods."""

import pytest
from helm_chart import CASES, by_kind, rayservice

NAMESPACE = "herd"
# Ray's own ports besides Serve's: GCS, dashboard, Ray client, object manager, node manager,
# dashboard agent, metrics, a worker port
RAY_PORTS = [6379, 8265, 10001, 8076, 8077, 52365, 8080, 10002]
SERVE_PORTS = [8000, 9000]


def matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart uses matchLabels only
    return selector.get("matchLabels", {}).items() <= labels.items()


def peer_admits(peer: dict, pod: dict, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return False  # pods are matched by selectors here
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], pod["namespace_labels"]):
            return False
    elif pod["namespace"] != policy_namespace:
        return False
    return matches(peer.get("podSelector", {}), pod["labels"])


def allowed(docs: list[dict], target_labels: dict, source: dict, port: int) -> bool:
    """Whether `source` may open TCP `port` on a pod with `target_labels` in NAMESPACE."""
    policies = [p for p in by_kind(docs, "NetworkPolicy") if matches(p["spec"]["podSelector"], target_labels)
                and "Ingress" in p["spec"]["policyTypes"]]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP"
                                             for p in ports):
                continue
            peers = rule.get("from")
            if peers is None or any(peer_admits(peer, source, NAMESPACE) for peer in peers):
                return True
    return False


def pod(labels: dict, namespace: str = NAMESPACE, namespace_labels: dict | None = None) -> dict:
    return {"labels": labels, "namespace": namespace,
            "namespace_labels": namespace_labels or {"kubernetes.io/metadata.name": namespace}}


def ray_pods(docs: list[dict]) -> list[dict]:
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    return [g["template"]["metadata"]["labels"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]


def redis_pod(docs: list[dict]) -> dict:
    (sts,) = by_kind(docs, "StatefulSet")
    return sts["spec"]["template"]["metadata"]["labels"]


OUTSIDER = pod({"app": "some-client"})  # another workload of the namespace
ELSEWHERE = pod({"app": "x"}, "other", {"kubernetes.io/metadata.name": "other"})
OPERATOR = pod({"app.kubernetes.io/name": "kuberay-operator"}, "kuberay-system",
               {"kubernetes.io/metadata.name": "kuberay-system"})


@pytest.mark.parametrize("case", ["default", "single-gpu", "multinode"])
def test_clients_reach_only_the_serve_ports(renders, case):
    docs = renders[case]
    for target in ray_pods(docs):
        for source in (OUTSIDER, ELSEWHERE):
            assert all(allowed(docs, target, source, p) for p in SERVE_PORTS)
            assert not [p for p in RAY_PORTS if allowed(docs, target, source, p)], target
        assert not allowed(docs, redis_pod(docs), OUTSIDER, 6379)
        assert not allowed(docs, redis_pod(docs), ELSEWHERE, 6379)


@pytest.mark.parametrize("case", ["default", "multinode"])
def test_the_release_reaches_everything_it_needs(renders, case):
    docs = renders[case]
    for source in ray_pods(docs):
        for target in ray_pods(docs):
            assert all(allowed(docs, target, pod(source), p) for p in RAY_PORTS + SERVE_PORTS)
        assert allowed(docs, redis_pod(docs), pod(source), 6379)
    # Redis itself is no Ray pod: it reaches nothing of Ray's
    assert not allowed(docs, ray_pods(docs)[0], pod(redis_pod(docs)), 6379)


def test_the_operator_reaches_only_the_dashboard(renders):
    docs = renders["default"]
    head = ray_pods(docs)[0]
    assert head["app.kubernetes.io/component"] == "ray-head"
    assert allowed(docs, head, OPERATOR, 8265)
    assert not [p for p in RAY_PORTS if p != 8265 and allowed(docs, head, OPERATOR, p)]
    assert not allowed(docs, redis_pod(docs), OPERATOR, 6379)


def test_metrics_only_from_where_prometheus_runs(renders):
    docs = renders["multinode"]  # a PodMonitor, networkPolicy.metricsFrom: the monitoring namespace
    prometheus = pod({"app": "prometheus"}, "monitoring", {"kubernetes.io/metadata.name": "monitoring"})
    for target in ray_pods(docs):
        assert allowed(docs, target, prometheus, 8080)
        assert not allowed(docs, target, prometheus, 6379) and not allowed(docs, target, ELSEWHERE, 8080)


def test_named_clients_and_dashboard_users(renders):
    docs = renders["options"]
    worker = ray_pods(docs)[1]
    app = pod({"app": "frontend"}, "apps", {"team": "apps"})
    assert all(allowed(docs, worker, app, p) for p in SERVE_PORTS)
    assert not any(allowed(docs, worker, OUTSIDER, p) for p in SERVE_PORTS)  # only the named clients now
    assert all(allowed(docs, worker, OPERATOR, p) for p in SERVE_PORTS)  # and the operator (proxy health)
    admin = pod({"role": "admin"})
    assert allowed(docs, ray_pods(docs)[0], admin, 8265) and not allowed(docs, ray_pods(docs)[0], admin, 6379)


def test_policies_select_the_pods_they_mean(renders):
    docs = renders["default"]
    ray_policy, redis_policy = by_kind(docs, "NetworkPolicy")
    assert all(matches(ray_policy["spec"]["podSelector"], labels) for labels in ray_pods(docs))
    assert not matches(ray_policy["spec"]["podSelector"], redis_pod(docs))
    assert matches(redis_policy["spec"]["podSelector"], redis_pod(docs))
    other_release = {**ray_pods(docs)[1], "app.kubernetes.io/instance": "other"}
    assert not allowed(docs, ray_pods(docs)[0], pod(other_release), 6379)  # another release's Ray pods


def test_policies_can_be_left_to_the_operator(renders):
    assert not by_kind(renders["opted-out"], "NetworkPolicy")
    assert not by_kind(renders["external-redis"], "NetworkPolicy")[1:]  # no Redis pod, no Redis policy


@pytest.mark.parametrize("case", CASES)
def test_every_policy_restricts_ingress_only(renders, case):
    for policy in by_kind(renders[case], "NetworkPolicy"):
        assert policy["spec"]["policyTypes"] == ["Ingress"]
