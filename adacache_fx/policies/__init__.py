"""Decision policies: which steps compute, from tensor code inside the graph.

Each policy is one module holding its config, its rule as a :class:`~.base.Policy` and its
registration (like torchao's handler per config type)::

    @register_policy(MyCacheConfig)
    class MyPolicy(Policy): ...

and one import line below, which registers it and exports its config (``adacache_fx.MyCacheConfig``).
``adacache_fx.transform(model, MyCacheConfig(...))`` then uses it; the rewrite, torch.compile, export
and calibration (:mod:`.replay`) need no change. Forecasting (:mod:`.forecast`) is an option of every
policy; :mod:`.common` holds the tensor code several rules share.
"""

from __future__ import annotations

from ..config import CacheConfig
from .adacache import AdaCacheConfig, AdaCachePolicy, MoRegConfig
from .adacache_plus import AdaCachePlusConfig, AdaCachePlusPolicy
from .base import FrameNeeds, GraphFacts, Needs, Policy, PolicyCall
from .easycache import EasyCacheConfig, EasyCachePolicy
from .first_block import FirstBlockCacheConfig, FirstBlockCachePolicy
from .magcache import MagCacheConfig, MagCachePolicy
from .registry import make_policy, policy_class, register_policy
from .teacache import TeaCacheConfig, TeaCachePolicy

#: The configs of the registered policies, exported by ``adacache_fx`` too.
CONFIGS = sorted(name for name, value in dict(globals()).items()
                 if isinstance(value, type) and issubclass(value, CacheConfig) and value is not CacheConfig
                 or value is MoRegConfig)

__all__ = [*CONFIGS, *sorted(name for name, value in dict(globals()).items()
                             if isinstance(value, type) and issubclass(value, Policy)),
           "FrameNeeds", "GraphFacts", "Needs", "PolicyCall", "make_policy", "policy_class", "register_policy"]
