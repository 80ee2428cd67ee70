"""EasyCache's decision rule (Zhou et al. 2025, "Less is Enough", arXiv 2507.02860) in the graph.

EasyCache needs no calibration: it measures at run time how much the model's output changes per unit
of change of its input (the *transformation rate* ``k``), and skips while the output change it predicts
from the input's change stays small. As its official code decides, with ``s`` the 1-based step of the
cache context's own generation:

* Steps ``s <= R`` (``R = int(retention_ratio * N + 0.5)``, tabulated as MagCache's; the official
  scripts use 10 of 50 steps) and the last step ``s = N`` compute, and reset the accumulated error to 0;
  so do steps ``s <= warmup_steps``.
* At a compute step ``s`` after a compute step ``l``: ``k = |v_s - v_l| / |x_s - x_l|`` (mean absolute
  changes of the output ``v`` and the input ``x``), kept with ``|v_s|`` for the steps after it. Until two
  steps have computed, ``k`` is unknown and every step computes.
* Every other step predicts the relative output change ``k |x_s - x_{s-1}| / |v_l|`` from the input's
  change since the step before, adds it to the accumulated error ``E``, and is *cached* iff
  ``E < threshold``; otherwise it computes and ``E = 0``. A NaN prediction computes.
* A cached step adds the residual of the stack kept from the last compute step (the official code adds
  the whole model's ``v_l - x_l`` to ``x_s``; here the block stack's, or its forecast).

Signals, found from the graph: the input ``x`` is the first block's timestep-modulated input (read on
every step before the decision, as TeaCache's: ``Needs.early_signal="modulated_input"``); the output
``v`` is the metric residual (``metric_block`` / ``metric_branch``, by default the middle block's first
residual branch), measured on compute steps. The means' element counts cancel in the prediction, so
the rule runs on sums (``||.||_1``), reducible across ranks. Deviations from the official code: its
signals are the raw latent and the whole model's output, here the first block's modulated input and a
block's residual (found in any DiT's graph, and inside the cached region's reach); and ``|x_s - x_l|`` is taken as
the sum of the step-to-step changes in between (the input's path length, equal to the distance when the
latent drifts one way, as it does while denoising), so that only step-to-step changes are kept. The
history columns are ``pred``, this step's predicted change (NaN where ``k`` is unknown), and ``err``,
the accumulated error after it (0 on compute steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import CacheConfig
from ..state import StateSpec
from .base import Needs, Policy
from .common import RetentionWindow, advance_step
from .registry import register_policy


@dataclass(frozen=True)
class EasyCacheConfig(CacheConfig):
    """EasyCache: skip while the output change predicted from the input's change, at the transformation
    rate measured between the last two compute steps, accumulates under ``threshold``.

    Takes every :class:`~adacache_fx.CacheConfig` argument and:

    Args:
        threshold: the accumulated predicted relative change under which steps are cached (the official
            scripts: 0.05 for Wan2.1, 0.025 for HunyuanVideo).
        retention_ratio: the first ``int(retention_ratio * N + 0.5)`` steps always compute (0.2: 10 of
            50 steps, as the official scripts).

    >>> EasyCacheConfig(threshold=0.05, num_steps=50).threshold
    0.05
    """

    threshold: float = 0.05
    retention_ratio: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"EasyCacheConfig.threshold must be a finite number >= 0, got {self.threshold!r}")
        if not 0 <= self.retention_ratio <= 1:
            raise ValueError(f"EasyCacheConfig.retention_ratio must be in [0, 1], got {self.retention_ratio!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "retention_ratio", float(self.retention_ratio))


@register_policy(EasyCacheConfig)
class EasyCachePolicy(Policy):
    """EasyCache's rule (module doc), as configured by an :class:`EasyCacheConfig`."""

    history_columns = ("pred", "err")

    def __init__(self, config: EasyCacheConfig, facts=None):
        super().__init__(config, facts)
        self.retention_steps = RetentionWindow(config.retention_ratio, max(1, config.warmup_steps))

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(metric=True, early_signal="modulated_input", remember_signal="every")

    def state_specs(self) -> tuple[StateSpec, ...]:
        return (StateSpec("easy_rate", (), torch.float32, math.nan),  # |v_l - v_l'| / |v_l| / |x_l - x_l'|
                StateSpec("easy_input", (), torch.float32, 0.0),  # the input's change since the last compute step
                StateSpec("easy_err", (), torch.float32, 0.0),  # accumulated predicted change
                StateSpec("easy_pred", (), torch.float32, math.nan))  # this step's predicted change

    def num_parts(self, site: int) -> int:
        return 2 if site == 0 else 3  # the input's (||x - x_prev||, ||x_prev||); the output's, and ||v||

    def measure(self, site, p, p_prev):
        if site == 0:
            return super().measure(site, p, p_prev)
        p, p_prev = p.float(), p_prev.float()
        return torch.stack([(p - p_prev).abs().sum(), p_prev.abs().sum(), p.abs().sum()])

    def replay_parts(self, site, since):
        if site == 0:
            return super().replay_parts(site, since)
        one = torch.ones_like(since)
        return torch.stack([since, one, one], dim=-1)  # relative change; |v_l| = |v_s| = 1

    def decide(self, step, num_steps, state, signal=None):
        s, fresh = advance_step(step, num_steps)
        change = signal[0][..., 0]  # ||x_s - x_{s-1}||_1 (stale on step 1, which computes)
        rate = torch.where(fresh, torch.full_like(state["easy_rate"], math.nan), state["easy_rate"])
        moved = torch.where(fresh, torch.zeros_like(change), state["easy_input"] + change)
        err = torch.where(fresh, torch.zeros_like(state["easy_err"]), state["easy_err"])
        forced = (s <= self.retention_steps(num_steps)) | (s == num_steps)
        pred = rate * change
        new_err = err + pred
        cached = ~forced & (new_err < self.config.threshold)  # an unknown (NaN) rate computes
        state = {"easy_rate": rate, "easy_input": moved, "easy_err": torch.where(cached, new_err, torch.zeros_like(err)),
                 "easy_pred": torch.where(forced, torch.full_like(pred, math.nan), pred)}
        return s, ~cached, state

    def update(self, s, compute, parts, state, num_steps):
        out = parts[1]  # (||v_s - v_l||, ||v_l||, ||v_s||) on a compute step
        moved = state["easy_input"]
        measured = compute & (s > 1) & (moved > 0)
        rate = torch.where(measured, out[..., 0] / out[..., 2].clamp_min(1e-12) / moved.clamp_min(1e-12),
                           state["easy_rate"])
        state = {"easy_rate": rate, "easy_input": torch.where(compute, torch.zeros_like(moved), moved),
                 "easy_err": state["easy_err"], "easy_pred": state["easy_pred"]}
        return state, {"pred": state["easy_pred"], "err": state["easy_err"]}
