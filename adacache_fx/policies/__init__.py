"""Decision policies: which steps compute, from tensor code inside the graph.

Each policy is one module implementing :class:`~adacache_fx.policies.base.Policy`, registered for the
config type that selects it (like torchao's handler per config type)::

    @register_policy(MyCacheConfig)
    class MyPolicy(Policy): ...

``adacache_fx.transform(model, MyCacheConfig(...))`` then uses it; the rewrite, torch.compile and
export paths need no change. Forecasting (:mod:`.forecast`) is an option of every policy.
"""

from __future__ import annotations

from .adacache import AdaCachePolicy
from .base import Policy, PolicyCall

_REGISTRY: dict[type, type[Policy]] = {}


def register_policy(config_type: type):
    """Class decorator: ``config_type`` configs are decided by the decorated :class:`Policy`, built as
    ``policy_class(config, num_sites, frame_layout)``, and under context parallelism with a frame layout
    ``policy_class(config, num_sites, frame_layout, shard)`` (a :class:`~adacache_fx.parallel.SequenceShard`:
    the metric residual is this rank's chunk of the frames)."""

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


def make_policy(config, num_sites: int, frame_layout: tuple[int, int] | None = None, shard=None) -> Policy:
    """The registered policy for ``config``'s type."""
    cls = policy_class(config)
    if cls is not None:
        return cls(config, num_sites, frame_layout) if shard is None else cls(config, num_sites, frame_layout, shard)
    raise TypeError(f"no caching policy is registered for {type(config).__name__}; registered: "
                    f"{[t.__name__ for t in _REGISTRY]}")


def _register_builtin() -> None:
    from ..config import AdaCacheConfig
    from .first_block import FirstBlockCacheConfig, FirstBlockCachePolicy

    register_policy(AdaCacheConfig)(AdaCachePolicy)
    register_policy(FirstBlockCacheConfig)(FirstBlockCachePolicy)


_register_builtin()

from .adacache_plus import AdaCachePlusConfig, AdaCachePlusPolicy  # noqa: E402  (registers itself: needs register_policy)
from .first_block import FirstBlockCacheConfig, FirstBlockCachePolicy  # noqa: E402  (registered above)
from .magcache import MagCacheConfig, MagCachePolicy  # noqa: E402  (likewise)
from .teacache import TeaCacheConfig, TeaCachePolicy  # noqa: E402  (likewise)

__all__ = ["AdaCachePlusConfig", "AdaCachePlusPolicy", "AdaCachePolicy", "FirstBlockCacheConfig",
           "FirstBlockCachePolicy", "MagCacheConfig", "MagCachePolicy", "Policy", "PolicyCall", "TeaCacheConfig", "TeaCachePolicy", "make_policy",
           "policy_class", "register_policy"]
