"""Request-routing policies by name (`routing.policy` in the config). An entry is the import path of
a Ray Serve `RequestRouter` class, or None for Serve's built-in power-of-two-choices router. A new
policy is one module in this package plus one line here."""

from __future__ import annotations

import importlib

REQUEST_ROUTERS: dict[str, str | None] = {
    "prefix_affinity": "deployments.routing.prefix_affinity:PrefixAffinityRouter",
    "power_of_two": None,
}


def request_router_class(policy: str) -> type | None:
    """The `RequestRouter` class of `policy` (None: Serve's default); KeyError for an unknown name."""
    path = REQUEST_ROUTERS[policy]
    if path is None:
        return None
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)
