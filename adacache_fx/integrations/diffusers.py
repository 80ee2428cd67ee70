"""One-line use with diffusers pipelines: ``adacache_fx.enable(pipe)`` / ``adacache_fx.disable(pipe)``.

Imports nothing from diffusers: a pipeline is used through its ``transformer`` and ``scheduler``.
"""

from __future__ import annotations

import functools
import warnings

from ..api import cached_model, transform
from ..module import CachedModel
from ..policies import AdaCacheConfig


class GenerationFollower:
    """A prepare hook that starts a new generation (in every cache context) when the pipeline starts one.

    Signals, from the pipeline's own objects: a call of ``scheduler.set_timesteps`` (wrapped here; every
    diffusers pipeline calls it once before its loop, whether or not the scheduler has a ``step_index``)
    and a scheduler replaced since the last call. The pipeline's ``cache_context(..., step_index=0,
    num_inference_steps=N)`` calls are followed by :meth:`CachedModel.cache_context` itself. N is the
    number of transformer calls per cache context: the scheduler's timesteps from its ``begin_index``
    (img2img pipelines start later), else the pipeline's ``num_timesteps``.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.scheduler = None  # the scheduler whose set_timesteps is wrapped
        self.pending = False  # set_timesteps was called: the next transformer call starts a generation
        self.warned: set[str] = set()
        self.watch(pipe.scheduler)

    def watch(self, scheduler) -> None:
        """Wrap ``scheduler.set_timesteps`` (on the instance; :meth:`unwatch` removes it)."""
        self.unwatch()
        self.scheduler = scheduler
        original = getattr(scheduler, "set_timesteps", None)
        if original is None:
            return

        @functools.wraps(original)  # keeps the signature diffusers inspects (timesteps=, sigmas=)
        def set_timesteps(*args, **kwargs):
            result = original(*args, **kwargs)
            self.pending = True
            return result

        set_timesteps.adacache_follower = self
        scheduler.set_timesteps = set_timesteps

    def unwatch(self) -> None:
        scheduler = self.scheduler
        if scheduler is not None and getattr(vars(scheduler).get("set_timesteps"), "adacache_follower", None) is self:
            del scheduler.set_timesteps
        self.scheduler = None

    def num_steps(self) -> int | None:
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return getattr(self.pipe, "num_timesteps", None)
        return len(timesteps) - (getattr(self.pipe.scheduler, "begin_index", None) or 0)

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=2)

    def __call__(self, model: CachedModel, args: tuple, kwargs: dict) -> None:
        scheduler = self.pipe.scheduler
        starts = self.pending or model.num_steps is None
        if scheduler is not self.scheduler:  # replaced since enable() or since the last call
            self.watch(scheduler)
            starts = True
        if self.scheduler_unwatched():
            name = type(scheduler).__name__
            self.warn_once(name, (
                f"adacache_fx.enable cannot tell where a generation starts with {name} (it has no "
                "set_timesteps): a generation ends after N calls in each cache context; call "
                "adacache_fx.reset(pipe.transformer) before a generation that follows an interrupted one"
            ))
        if not starts:
            return
        self.pending = False
        n = self.num_steps()
        if n is None:
            return
        if n < 3:
            warnings.warn(
                f"adacache_fx: {n} denoising step(s), fewer than 3: every step computes (nothing is cached)",
                stacklevel=2,
            )
        model.reset()  # every context starts over, also after an interrupted generation
        model.begin_generation(int(n))

    def scheduler_unwatched(self) -> bool:
        return getattr(vars(self.scheduler).get("set_timesteps"), "adacache_follower", None) is not self


def enable(pipe, config: AdaCacheConfig | None = None) -> CachedModel:
    """Transform ``pipe.transformer`` with AdaCache and follow the pipeline's generations.

    Every pipeline call starts a new generation in every cache context, with N the number of
    timesteps the scheduler set (``num_inference_steps`` for most schedulers), whatever the scheduler.
    Classifier-free guidance: pipelines that run the two halves as separate calls under
    ``cache_context("cond")`` / ``("uncond")`` get a state (and decisions) per half; a batched call
    (``cache_context("cond_uncond")``) shares one. Fewer than 3 steps: every step computes, with a
    warning. Returns the transformed transformer.

    >>> import torch, adacache_fx
    >>> from adacache_fx.tools.fixtures import tiny_wan_pipeline  # a stock WanPipeline, tiny and random
    >>> pipe = tiny_wan_pipeline()
    >>> pipe.set_progress_bar_config(disable=True)
    >>> cached = adacache_fx.enable(pipe)
    >>> embeds = torch.randn(1, 8, 32)
    >>> video = pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=16, width=16, num_frames=5,
    ...              num_inference_steps=12, output_type="pt").frames
    >>> report = adacache_fx.report(cached, "cond")
    >>> report.num_steps, report.num_computed < 12
    (12, True)
    >>> adacache_fx.disable(pipe)
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
    follower = GenerationFollower(pipe)
    cached._adacache_follower = (follower, cached.register_prepare_hook(follower))
    pipe.transformer = cached
    return cached


def disable(pipe) -> None:
    """Restore the pipeline's original transformer and scheduler (every wrapping undone)."""
    try:
        inner = cached_model(getattr(pipe, "transformer", None))
    except TypeError:
        raise ValueError("AdaCache is not enabled on this pipeline") from None
    follower, handle = inner.__dict__.pop("_adacache_follower", (None, None))
    if follower is not None:
        handle.remove()
        follower.unwatch()
    pipe.transformer = inner.model
