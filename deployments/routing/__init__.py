"""Request routing: which router-service replica takes each request. Policies are Ray Serve
`RequestRouter`s, chosen by name (`routing.policy`) from the one registry that the config schema
and app building both read (registry.py)."""
