"""AdaCache+: AdaCache's per-video metric, accumulated as MagCache accumulates its error.

A :class:`~adacache_fx.policies.base.Policy` in the AdaCache family: the decision follows the measured
residual change of *this* video, online (no per-step calibrated ratios), and adds what makes the peers
strong on the reference model: the first steps compute densely, reuse runs are capped, and a cached step
may add a forecast. Steps are counted ``s = 1..N`` within a generation (per cache context):

* Forced compute steps: ``s <= max(1, R, warmup_steps)`` with ``R = int(retention_ratio * N + 0.5)``
  (Python's float arithmetic, tabulated for N <= 1024; float32 above), and the last ``final_steps``
  steps (``s > N - final_steps``).
* At a compute step ``s > 1`` whose previous compute step is ``l``, the metric residual p (as AdaCache:
  by default the first residual branch of the middle block) gives the measured per-step change
  ``c = ||p_s - p_l||_1 / ||p_l||_1 / (s - l)`` (float32, summed over all elements; several metric sites
  average their relative distances before the division). ``c`` is kept until the next compute step;
  before the first measurement of a generation ``c = inf``.
* Every other step ``s`` predicts its change by accumulating: ``acc' = acc + c``, ``run' = run + 1``
  (``acc = 0``, ``run = 0`` after each compute step). The step is *cached* when ``acc' <= threshold``
  and ``run' <= max_skip_steps``; then ``acc, run = acc', run'``. Otherwise it computes (and measures a
  new ``c``, resetting ``acc`` and ``run``). A NaN or infinite ``c`` computes.
* Equivalently, after a compute step the next ``min(floor(threshold / c), max_skip_steps)`` steps are
  cached (up to float rounding of the accumulation): a continuous AdaCache codebook ``rate = 1 +
  min(floor(threshold / c), K)`` with a retention window and a capped rate.
* A cached step adds the cached residual or its forecast (``extrapolation_order`` 1 or 2, TaylorSeer's),
  scaled by ``forecast_gain`` (a fixed share, or ``"fit"``: refitted to the video on each compute step).
  On the reference model the linear forecast at gain 0.5 is the leading setting (``adacache-fx bench``,
  method ``adacache-plus-forecast``); the whole forecast helps most videos and ruins a few.

The threshold is on the scale of the model's metric: :func:`adacache_fx.calibrate_plus` fits it for a
target speedup in computed steps from uncached metric trajectories. The history columns are ``c``
measured at this step (NaN on cached steps and step 1), ``acc`` the accumulated predicted change and
``run`` the length of the reuse run after this step (0 on compute steps).
The metric parts of a site are ``(||p - p_prev||_1, ||p_prev||_1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import CacheConfig
from ..state import StateSpec
from .base import Policy
from .common import RetentionWindow, advance_step, mean_distance, nan_where_not
from .registry import register_policy


@dataclass(frozen=True)
class AdaCachePlusConfig(CacheConfig):
    """AdaCache+: cache while this video's accumulated measured change stays under a threshold.

    Takes every :class:`~adacache_fx.CacheConfig` argument and (see :mod:`adacache_fx.policies.adacache_plus`):

    Args:
        threshold: a step is cached while ``k * c <= threshold`` (k-th step of the reuse run, c the
            per-step relative L1 change of the metric residual measured at the last compute step).
            Fit it with :func:`adacache_fx.calibrate_plus`.
        max_skip_steps: K, the most consecutive cached steps.
        retention_ratio: the first ``int(retention_ratio * N + 0.5)`` steps always compute.
        final_steps: the last ``final_steps`` steps always compute.
    """

    threshold: float = 0.2
    max_skip_steps: int = 2
    retention_ratio: float = 0.2
    final_steps: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold!r}")
        for name in ("max_skip_steps", "final_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not 0 <= self.retention_ratio <= 1:
            raise ValueError(f"retention_ratio must be in [0, 1], got {self.retention_ratio!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "retention_ratio", float(self.retention_ratio))

    def retention_steps(self, num_steps: int) -> int:
        """The forced first steps for N = ``num_steps``: ``max(1, R, warmup_steps)``."""
        return max(1, int(self.retention_ratio * num_steps + 0.5), self.warmup_steps)


@register_policy(AdaCachePlusConfig)
class AdaCachePlusPolicy(Policy):
    """The AdaCache+ rule (module doc), as configured by an :class:`AdaCachePlusConfig`."""

    history_columns = ("c", "acc", "run")
    checked_column = "c"

    def __init__(self, config: AdaCachePlusConfig, facts=None):
        super().__init__(config, facts)
        self.threshold, self.max_skip, self.final_steps = config.threshold, config.max_skip_steps, config.final_steps
        # max(1, int(retention_ratio * N + 0.5), warmup_steps), as config.retention_steps on the host
        self.retention_steps = RetentionWindow(config.retention_ratio, max(1, config.warmup_steps))

    def state_specs(self) -> tuple[StateSpec, ...]:
        return (StateSpec("plus_c", (), torch.float32, math.inf), StateSpec("plus_acc", (), torch.float32, 0.0),
                StateSpec("plus_run", (), torch.int64, 0), StateSpec("plus_last", (), torch.int64, 1))

    def decide(self, step, num_steps, state, signal=None):
        s, fresh = advance_step(step, num_steps)
        c = torch.where(fresh, torch.full_like(state["plus_c"], math.inf), state["plus_c"])
        acc = torch.where(fresh, torch.zeros_like(state["plus_acc"]), state["plus_acc"])
        run = torch.where(fresh, torch.zeros_like(state["plus_run"]), state["plus_run"])
        forced = (s <= self.retention_steps(num_steps)) | (s > num_steps - self.final_steps)
        new_acc, new_run = acc + c, run + 1
        skip = ~forced & (new_acc <= self.threshold) & (new_run <= self.max_skip)
        state = {"plus_c": c, "plus_acc": torch.where(skip, new_acc, acc), "plus_run": torch.where(skip, new_run, run),
                 "plus_last": state["plus_last"]}
        return s, ~skip, state

    def update(self, s, compute, parts, state, num_steps):
        distance = mean_distance(parts)
        has_metric = compute & (s > 1)
        since = (s - state["plus_last"]).clamp_min(1).to(torch.float32)
        measured = distance / since
        c = torch.where(has_metric, measured, state["plus_c"])
        acc = torch.where(compute, torch.zeros_like(state["plus_acc"]), state["plus_acc"])
        run = torch.where(compute, torch.zeros_like(state["plus_run"]), state["plus_run"])
        row = {"c": nan_where_not(has_metric, measured), "acc": acc, "run": run.to(torch.float32)}
        return {"plus_c": c, "plus_acc": acc, "plus_run": run,
                "plus_last": torch.where(compute, s, state["plus_last"])}, row
