"""The request-routing registry is the one list of policies: the config accepts exactly its names
and app building takes the policy's RequestRouter from it."""

import pytest
from pydantic import ValidationError

from cluster.app import _request_router
from deployments.config import HerdConfig, RoutingConfig
from deployments.routing.prefix_affinity import PrefixAffinityRouter
from deployments.routing.registry import REQUEST_ROUTERS, request_router_class


def test_config_accepts_the_registry_names_only():
    for name in REQUEST_ROUTERS:
        assert RoutingConfig(policy=name).policy == name
    with pytest.raises(ValidationError, match="unknown routing policy 'round_robin'"):
        HerdConfig(model="m", routing={"policy": "round_robin"})


def test_app_building_uses_the_registry():
    assert request_router_class("prefix_affinity") is PrefixAffinityRouter
    assert request_router_class("power_of_two") is None
    options = _request_router(RoutingConfig(policy="prefix_affinity", chunk_tokens=64))
    assert options["request_router_config"].request_router_kwargs["chunk_tokens"] == 64
    assert _request_router(RoutingConfig(policy="power_of_two")) == {}
