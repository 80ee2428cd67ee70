"""The user-facing verbs: transform, reset, report."""

from __future__ import annotations

from torch import nn

from .config import CacheConfig
from .module import CachedModel
from .policies import AdaCacheConfig, policy_class
from .report import Report, StepRecord

__all__ = ["Report", "StepRecord", "cached_model", "report", "reset", "transform"]


def transform(model: nn.Module, config: CacheConfig | None = None, dynamic_shapes: dict | str | None = None) -> CachedModel:
    """Return ``model`` wrapped so that its block stack is cached (with AdaCache unless ``config`` selects
    another registered policy, see :mod:`adacache_fx.policies`).

    The model is captured lazily on its first call (like ``torch.compile``); the result can be
    called, compiled with ``torch.compile(..., fullgraph=True)`` or exported like the original.

    ``dynamic_shapes``: ``torch.export``'s form, by argument name (``{"hidden_states": {2: Dim("frames")}}``),
    or ``"auto"`` (dims 0, 2, 3, 4 of the first 5-D tensor argument: batch, frames, height, width of a video
    latent): one capture serves every size of those dims, with a state per size. A dimension the forward
    specializes is named in a warning (with the export's reason) and gets a capture per value, as without.

    >>> import torch, adacache_fx
    >>> from adacache_fx.tools.fixtures import tiny_dit
    >>> model, make_inputs = tiny_dit()
    >>> cached = adacache_fx.transform(model, adacache_fx.AdaCacheConfig(num_steps=10))
    >>> outputs = [cached(**make_inputs(step)) for step in range(10)]
    >>> adacache_fx.report(cached).num_computed < 10
    True
    """
    if isinstance(model, CachedModel):
        raise ValueError("this model is already transformed by adacache_fx")
    if not isinstance(model, nn.Module):
        raise TypeError(f"adacache_fx.transform expects an nn.Module, got {type(model).__name__}")
    if config is None:
        config = AdaCacheConfig()
    if policy_class(config) is None:
        raise TypeError(
            f"config must be an adacache_fx.AdaCacheConfig (or a config type with a registered policy), "
            f"got {type(config).__name__}"
        )
    return CachedModel(model, config, dynamic_shapes)


def cached_model(model) -> CachedModel:
    """The :class:`CachedModel` behind ``model`` (itself, or the module a ``torch.compile`` wraps)."""
    inner = getattr(model, "_orig_mod", model)
    if not isinstance(inner, CachedModel):
        raise TypeError(
            f"expected a model returned by adacache_fx.transform, got {type(model).__name__}: call "
            "model = adacache_fx.transform(model, adacache_fx.AdaCacheConfig(...)) first"
        )
    return inner


def reset(model, num_steps: int | None = None) -> None:
    """Start a new generation (in every cache context); optionally set the number of steps N."""
    cached_model(model).reset(num_steps)


def release(model, context: str) -> None:
    """Free the state of a cache context (a finished request; :meth:`CachedModel.release`)."""
    cached_model(model).release(context)


def report(model, context: str | None = None):
    """Per-step records of the current generation (computed or cached, metric c, motion m, rate); one
    report per batch row with ``batch_decisions="per_sample"``.

    Reads the state from the device: call it after a generation, not inside the loop. Given a pipeline
    (``enable(pipe)``): a report per denoiser that ran in its latest generation, ``{name: {context:
    Report}}`` (``{name: Report}`` with a ``context``), e.g. ``report(pipe)["transformer_2"]["cond"]``.
    """
    if not isinstance(model, nn.Module) and hasattr(model, "components"):
        from .integrations.diffusers import pipeline_report

        return pipeline_report(model, context)
    return cached_model(model).report(context)
