"""FirstBlockCache's decision rule (ParaAttention; diffusers ``hooks/first_block_cache.py``) in the graph.

Semantics, as diffusers' ``FirstBlockCacheConfig(threshold)`` implements it:

* The first block always runs (it is left outside every cached region: :attr:`Policy.early_signal`
  ``"first_block"``). Its residual ``r = out - inp`` on the latent stream (diffusers:
  ``hidden_states`` output minus input) is the signal of the step.
* Step 1 of a generation always computes (diffusers: no residual kept yet; its state is reset per
  generation and kept per cache context, as here).
* Every later step compares ``r`` with ``r_prev``, the first block's residual at the *last compute
  step* (it is replaced on compute steps only, so changes accumulate against that step):
  ``diff = mean|r - r_prev| / mean|r_prev|`` (here the equal ratio of sums, in float32). The step
  computes the remaining blocks iff ``diff > threshold`` (a NaN ``diff`` compares false and reuses,
  as diffusers' ``.item() > threshold`` does). There is no forced last step, and no cap on reuse.
* A cached step adds to the first block's output the residual ``out_last - out_first`` of the remaining
  blocks kept from the last compute step (or its forecast with ``extrapolation_order`` 1 or 2).

Granularity: FirstBlockCache defines one cached region over blocks 1..n-1 (``"stack"``). ``"block"``
and ``"branch"`` cache the same residual per block or per residual branch of blocks 1..n-1, all with the
same decision: the output equals the stack's up to float rounding (the per-block residuals telescope),
for more cache memory. ``metric_block`` / ``metric_branch`` do not apply (the signal is the first
block's residual) and are refused. ``warmup_steps`` forces steps 1..k to compute (diffusers has none).
The history column ``diff`` is recorded on every step after the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import CacheConfig
from ..state import StateSpec
from .base import Needs, Policy
from .common import advance_step, nan_where_not, relative
from .registry import register_policy


@dataclass(frozen=True)
class FirstBlockCacheConfig(CacheConfig):
    """FirstBlockCache: the remaining blocks run when the first block's residual changed by more than
    ``threshold`` (relative L1, against the last compute step); see :mod:`adacache_fx.policies.first_block`.

    Takes the :class:`~adacache_fx.CacheConfig` arguments ``num_steps``, ``granularity``, ``warmup_steps``,
    ``extrapolation_order``, ``static_inputs``, and:

    Args:
        threshold: the relative change above which a step computes (diffusers' default 0.05).

    >>> FirstBlockCacheConfig(threshold=0.1, num_steps=30).threshold
    0.1
    """

    threshold: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        threshold = float(self.threshold)
        if math.isnan(threshold) or threshold < 0:
            raise ValueError(f"FirstBlockCacheConfig.threshold must be >= 0, got {self.threshold!r}")
        object.__setattr__(self, "threshold", threshold)
        if self.metric_block is not None or self.metric_branch != 0:
            raise ValueError("FirstBlockCacheConfig reads the first block's residual: metric_block and "
                             "metric_branch do not apply")


@register_policy(FirstBlockCacheConfig)
class FirstBlockCachePolicy(Policy):
    """FirstBlockCache's rule on the early signal of the first block (see the module docstring)."""

    history_columns = ("diff",)
    checked_column = "diff"

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(metric=False, early_signal="first_block", remember_signal="compute")

    def state_specs(self) -> tuple[StateSpec, ...]:
        return (StateSpec("diff", (), torch.float32, float("nan")),)  # this step's relative change

    def decide(self, step, num_steps, state, signal=None):
        s, _ = advance_step(step, num_steps)
        diff = relative(signal[0])
        compute = (s <= max(1, self.config.warmup_steps)) | (diff > self.config.threshold)
        return s, compute, {"diff": diff}

    def update(self, s, compute, parts, state, num_steps):
        return state, {"diff": nan_where_not(s > 1, state["diff"])}
