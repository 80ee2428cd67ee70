"""MagCache's decision rule (Ma et al. 2025) as a :class:`~adacache_fx.policies.base.Policy`.

The rule is diffusers' ``hooks/mag_cache.py`` (``MagCacheHeadHook``), step for step, with the step index
``i = s - 1`` (0-based) of the cache context's own generation:

* ``ratios``: the calibrated per-step magnitude ratios (``mag_ratios``; see
  :func:`adacache_fx.calibrate_magnitudes`), of length L. When L differs from N they are resampled by
  nearest neighbour as ``diffusers.hooks.mag_cache.nearest_interp`` does: step ``i`` reads
  ``ratios[round(i * (L - 1) / (N - 1))]`` (float32, round half to even; ``ratios[L - 1]`` when N = 1).
  Here N is the generation's, known at run time, so one config serves every N.
* Retention: steps with ``i < int(retention_ratio * N + 0.5)`` (Python's float arithmetic, tabulated for
  N <= 1024; float32 above) compute and leave the accumulators alone; so do steps ``s <= warmup_steps``.
* Every later step first accumulates ``ratio *= ratios[i]``, ``steps += 1``, ``err += |1 - ratio|``
  (float32; the accumulators start at ``(1, 0, 0)`` in each generation), then is *skipped* when a residual
  is cached (``s > 1``), ``err <= threshold`` and ``steps <= max_skip_steps``; otherwise it computes and
  resets the accumulators to ``(1, 0, 0)``.
* A skipped step adds the cached residual (or its forecast, ``extrapolation_order``). No step is forced
  to compute at the end of the generation (unlike AdaCache).

Each cache context (the ``"cond"`` / ``"uncond"`` calls of CFG) keeps its own accumulators and step index,
as diffusers' per-context hook state does, and indexes the same ratios by its own step. The decision
needs no measurement (``Needs(metric=False)``): the rewrite plans no metric site, so no residual is
measured or kept for it. The history columns ``err``, ``ratio``, ``steps`` hold the accumulators after
this step's accumulation, before a reset (``(0, 1, 0)`` during the retention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import CacheConfig
from ..state import StateSpec
from .base import Needs, Policy
from .common import RetentionWindow, advance_step, lookup
from .registry import register_policy


@dataclass(frozen=True)
class MagCacheConfig(CacheConfig):
    """MagCache: skip while the accumulated magnitude-ratio error stays under a threshold.

    Takes every :class:`~adacache_fx.CacheConfig` argument and (names and defaults as diffusers'
    ``MagCacheConfig``):

    Args:
        mag_ratios: per-step magnitude ratios of the model (required): the mean over tokens of
            ``||r_i|| / ||r_{i-1}||`` of the block stack's residual, 1.0 first; from
            :func:`adacache_fx.calibrate_magnitudes`, or diffusers' calibration mode. Resampled to N.
        threshold: a step is skipped while the accumulated error is ``<= threshold``.
        max_skip_steps: K, the most consecutive skipped steps.
        retention_ratio: the first ``int(retention_ratio * N + 0.5)`` steps always compute.
    """

    mag_ratios: Sequence[float] = ()
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        ratios = tuple(float(r) for r in self.mag_ratios)
        if not ratios or not all(math.isfinite(r) for r in ratios):
            raise ValueError("MagCacheConfig needs mag_ratios (finite, one per step): measure them with "
                             "adacache_fx.calibrate_magnitudes(pipe, captions, num_steps)")
        object.__setattr__(self, "mag_ratios", ratios)
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold!r}")
        if isinstance(self.max_skip_steps, bool) or not isinstance(self.max_skip_steps, int) or self.max_skip_steps < 0:
            raise ValueError(f"max_skip_steps must be an int >= 0, got {self.max_skip_steps!r}")
        if not 0 <= self.retention_ratio <= 1:
            raise ValueError(f"retention_ratio must be in [0, 1], got {self.retention_ratio!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "retention_ratio", float(self.retention_ratio))


@register_policy(MagCacheConfig)
class MagCachePolicy(Policy):
    """MagCache's rule (module doc), as configured by a :class:`MagCacheConfig`."""

    history_columns = ("err", "ratio", "steps")

    def __init__(self, config: MagCacheConfig, facts=None):
        super().__init__(config, facts)
        self.threshold, self.max_skip = config.threshold, config.max_skip_steps
        self.warmup_steps = config.warmup_steps
        self.register_buffer("ratios", torch.tensor(config.mag_ratios, dtype=torch.float32), persistent=False)
        self.retention_steps = RetentionWindow(config.retention_ratio)  # int(retention_ratio * N + 0.5)

    def state_specs(self) -> tuple[StateSpec, ...]:
        return (StateSpec("mag_ratio", (), torch.float32, 1.0), StateSpec("mag_err", (), torch.float32, 0.0),
                StateSpec("mag_steps", (), torch.int64, 0))

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(metric=False)  # the rule reads the calibrated ratios only

    def ratio_at(self, i: torch.Tensor, num_steps: torch.Tensor) -> torch.Tensor:
        """``ratios`` resampled to N, at 0-based step ``i`` (nearest neighbour, as diffusers)."""
        last = self.ratios.numel() - 1
        scale = torch.full((), float(last), device=i.device) / (num_steps - 1).clamp_min(1).to(torch.float32)
        index = torch.round(i.to(torch.float32) * scale).to(torch.int64).clamp(0, last)
        index = torch.where(num_steps == 1, torch.full_like(index, last), index)
        return lookup(self.ratios, index)

    def decide(self, step, num_steps, state, signal=None):
        s, fresh = advance_step(step, num_steps)
        ratio = torch.where(fresh, torch.ones_like(state["mag_ratio"]), state["mag_ratio"])
        err = torch.where(fresh, torch.zeros_like(state["mag_err"]), state["mag_err"])
        steps = torch.where(fresh, torch.zeros_like(state["mag_steps"]), state["mag_steps"])
        i = s - 1
        active = (i >= self.retention_steps(num_steps)) & (s > self.warmup_steps)
        new_ratio = ratio * self.ratio_at(i, num_steps)
        new_steps = steps + 1
        new_err = err + (1.0 - new_ratio).abs()
        skip = active & (s > 1) & (new_err <= self.threshold) & (new_steps <= self.max_skip)
        # the accumulators as this step left them; update() resets them after a compute step (a no-op
        # during the retention, where they still hold their initial values)
        state = {"mag_ratio": torch.where(active, new_ratio, ratio), "mag_err": torch.where(active, new_err, err),
                 "mag_steps": torch.where(active, new_steps, steps)}
        return s, ~skip, state

    def update(self, s, compute, parts, state, num_steps):
        ratio, err, steps = state["mag_ratio"], state["mag_err"], state["mag_steps"]
        row = {"err": err, "ratio": ratio, "steps": steps.to(torch.float32)}
        return {"mag_ratio": torch.where(compute, torch.ones_like(ratio), ratio),
                "mag_err": torch.where(compute, torch.zeros_like(err), err),
                "mag_steps": torch.where(compute, torch.zeros_like(steps), steps)}, row
