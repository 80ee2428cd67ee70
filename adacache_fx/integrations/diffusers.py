"""One-line use with diffusers pipelines: ``adacache_fx.enable(pipe)`` / ``adacache_fx.disable(pipe)``.

Imports nothing from diffusers: a pipeline is used through its ``transformer`` and ``scheduler``.
"""

from __future__ import annotations

from ..api import cached_model, transform
from ..config import AdaCacheConfig
from ..module import CachedModel


class SchedulerFollower:
    """A prepare hook: a new generation starts when the pipeline's scheduler has not stepped yet."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def __call__(self, model: CachedModel, args: tuple, kwargs: dict) -> None:
        scheduler = self.scheduler
        if getattr(scheduler, "step_index", None) in (None, 0):
            timesteps = getattr(scheduler, "timesteps", None)
            if timesteps is not None and len(timesteps) >= 3:
                model.begin_generation(len(timesteps))


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
    cached.register_prepare_hook(SchedulerFollower(scheduler))
    pipe.transformer = cached
    return cached


def disable(pipe) -> None:
    """Restore the pipeline's original transformer."""
    try:
        inner = cached_model(getattr(pipe, "transformer", None))
    except TypeError:
        raise ValueError("AdaCache is not enabled on this pipeline") from None
    pipe.transformer = inner.model
