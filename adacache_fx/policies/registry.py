"""The policy registered for each config type (like torchao's handler per config type)."""

from __future__ import annotations

from .base import GraphFacts, Policy

_REGISTRY: dict[type, type[Policy]] = {}


def register_policy(config_type: type):
    """Class decorator: ``config_type`` configs are decided by the decorated :class:`~.base.Policy`,
    built as ``policy_class(config, facts)`` (a :class:`~.base.GraphFacts`)."""

    def register(policy_class: type[Policy]) -> type[Policy]:
        _REGISTRY[config_type] = policy_class
        return policy_class

    return register


def policy_class(config) -> type[Policy] | None:
    """The policy registered for ``config``'s type (or a base type), or None."""
    for config_type in type(config).__mro__:
        if config_type in _REGISTRY:
            return _REGISTRY[config_type]
    return None


def make_policy(config, facts: GraphFacts | None = None) -> Policy:
    """The registered policy for ``config``'s type, built with what the rewrite found."""
    cls = policy_class(config)
    if cls is None:
        raise TypeError(f"no caching policy is registered for {type(config).__name__}; registered: "
                        f"{[t.__name__ for t in _REGISTRY]}")
    return cls(config, facts or GraphFacts())
