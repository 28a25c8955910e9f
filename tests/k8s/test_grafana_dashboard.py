"""The Grafana dashboard ConfigMap: sidecar label, valid JSON, the panels operators need."""

import json

from helm_chart import by_kind

PANELS = ["TTFT", "ITL", "Throughput (tokens/s)", "KV blocks used / free",
          "Prefix hit rate by tier (local / shared)", "Expert tokens per shard", "Expert load per expert",
          "Shared prefix cache (Redis)"]


def test_dashboard_configmap_holds_the_panels(renders):
    (cm,) = [c for c in by_kind(renders["default"], "ConfigMap") if "grafana" in c["metadata"]["name"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    dashboard = json.loads(text)
    titles = [p["title"] for p in dashboard["panels"]]
    for wanted in PANELS:
        assert any(title.startswith(wanted) for title in titles), wanted
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    hit_rate = next(p for p in dashboard["panels"] if p["title"].startswith("Prefix hit rate"))
    assert "local|shared" in hit_rate["targets"][0]["expr"]
    assert "tier" in hit_rate["targets"][0]["legendFormat"]
