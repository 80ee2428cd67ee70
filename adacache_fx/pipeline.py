"""One-line use with diffusers pipelines: ``adacache_fx.enable(pipe)`` / ``adacache_fx.disable(pipe)``."""

from __future__ import annotations

from .api import transform
from .config import AdaCacheConfig
from .module import CachedModel


def enable(pipe, config: AdaCacheConfig | None = None) -> CachedModel:
    """Transform ``pipe.transformer`` with AdaCache and follow the pipeline's generations.

    Every pipeline call starts a new generation whose number of steps N is the scheduler's number of
    timesteps (``num_inference_steps``): nobody counts steps by hand. Classifier-free guidance works
    through the pipeline's ``cache_context("cond")`` / ``("uncond")`` calls, or a batched call.
    Returns the transformed transformer.
    """
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{type(pipe).__name__} has no `transformer` to cache")
    if isinstance(getattr(transformer, "_orig_mod", transformer), CachedModel):
        raise ValueError("AdaCache is already enabled on this pipeline; call adacache_fx.disable(pipe) first")
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "timesteps"):
        raise ValueError(f"{type(pipe).__name__} has no scheduler with timesteps to take N from")
    cached = transform(transformer, config)
    cached._scheduler = scheduler
    pipe.transformer = cached
    return cached


def disable(pipe) -> None:
    """Restore the pipeline's original transformer."""
    cached = getattr(pipe, "transformer", None)
    inner = getattr(cached, "_orig_mod", cached)
    if not isinstance(inner, CachedModel):
        raise ValueError("AdaCache is not enabled on this pipeline")
    pipe.transformer = inner.model
