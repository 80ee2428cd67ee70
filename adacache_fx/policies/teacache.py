"""TeaCache's decision rule (Liu et al. 2024, "Timestep Embedding Tells") in the graph.

Semantics, as the official TeaCache code implements it for its video models (HunyuanVideo, Wan2.1,
CogVideoX, ...), with ``s`` the 1-based step of the cache context's own generation:

* The signal is the *timestep-modulated input* of the first block: the tensor its first linear layer on
  the latent stream reads (``norm(x) * (1 + scale) + shift``; for CogVideoX the text and video tokens
  concatenated). It is found from the graph (:attr:`Policy.early_signal` ``"modulated_input"``): the
  first ``linear`` of block 0 whose input depends on the block's stream. Its ancestors inside block 0
  are copied into the main graph before the decision, so every block, the first included, is skipped
  on a cached step (the copies cost a norm and the block's modulation, as TeaCache's own ``clone``).
* The kept signal is replaced on *every* step (``remember_signal="every"``), so the change is measured
  step to step: ``rel = mean|x_s - x_{s-1}| / mean|x_{s-1}|`` (here the equal ratio of sums, float32).
* Steps ``s <= max(1, warmup_steps)`` and the last step ``s = N`` compute and reset the accumulator to 0
  (TeaCache: ``cnt == 0 or cnt == num_steps - 1``; with ``ret_steps`` more leading steps).
* Every other step accumulates ``acc += poly(rel)``, ``poly`` the rescaling polynomial with
  ``coefficients`` (highest degree first, as ``numpy.poly1d``; float32 Horner), and is skipped iff
  ``acc < threshold``; otherwise it computes and resets ``acc = 0`` (a NaN ``acc`` is not below the
  threshold: it computes and resets, as TeaCache's ``if acc < thresh: skip else: compute``). There is no
  cap on consecutive skips.
* A cached step adds the residual of the whole stack kept from the last compute step (or its forecast
  with ``extrapolation_order``), as TeaCache's ``previous_residual``.

Each cache context (CFG's ``"cond"`` / ``"uncond"`` calls) keeps its own accumulator and signal, as the
official Wan2.1 code keeps its even and odd calls apart. The polynomial maps the input change to the
*output* change of the model; :func:`adacache_fx.calibrate_teacache` fits it to a model (degree 4 by
least squares on uncached generations, as TeaCache's calibration). The default ``(1.0, 0.0)`` is the
identity: the accumulated raw input change. The history columns are ``rel``, the step's raw change (NaN
on step 1), and ``acc``, the accumulator after its addition, before the reset of a compute step (0 on
the forced steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import CacheConfig
from ..state import StateSpec
from .base import Needs, Policy
from .common import advance_step, nan_where_not, relative
from .registry import register_policy


@dataclass(frozen=True)
class TeaCacheConfig(CacheConfig):
    """TeaCache: skip while the accumulated, rescaled change of the first block's modulated input stays
    under ``threshold``; see :mod:`adacache_fx.policies.teacache`.

    Takes the :class:`~adacache_fx.CacheConfig` arguments ``num_steps``, ``granularity``, ``warmup_steps``
    (TeaCache's ``ret_steps``), ``extrapolation_order``, ``forecast_gain``, ``static_inputs``, and:

    Args:
        threshold: TeaCache's ``rel_l1_thresh`` (its papers use 0.1-0.3 with fitted coefficients).
        coefficients: the rescaling polynomial, highest degree first (``numpy.poly1d``); from
            :func:`adacache_fx.calibrate_teacache`. ``(1.0, 0.0)``: no rescaling.

    >>> TeaCacheConfig(threshold=0.2, coefficients=(2.0, 0.0), num_steps=30).coefficients
    (2.0, 0.0)
    """

    threshold: float = 0.1
    coefficients: Sequence[float] = (1.0, 0.0)

    def __post_init__(self):
        super().__post_init__()
        threshold = float(self.threshold)
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"TeaCacheConfig.threshold must be a finite number >= 0, got {self.threshold!r}")
        object.__setattr__(self, "threshold", threshold)
        coefficients = tuple(float(c) for c in self.coefficients)
        if not coefficients or not all(math.isfinite(c) for c in coefficients):
            raise ValueError(f"TeaCacheConfig.coefficients must be finite numbers (highest degree first), "
                             f"got {self.coefficients!r}")
        object.__setattr__(self, "coefficients", coefficients)
        if self.metric_block is not None or self.metric_branch != 0:
            raise ValueError("TeaCacheConfig reads the first block's modulated input: metric_block and "
                             "metric_branch do not apply")


@register_policy(TeaCacheConfig)
class TeaCachePolicy(Policy):
    """TeaCache's rule on the modulated input of the first block (see the module docstring)."""

    history_columns = ("rel", "acc")
    checked_column = "rel"

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(metric=False, early_signal="modulated_input", remember_signal="every")

    def state_specs(self) -> tuple[StateSpec, ...]:
        return (StateSpec("tea_rel", (), torch.float32, float("nan")),  # this step's raw change
                StateSpec("tea_acc", (), torch.float32, 0.0))  # accumulated rescaled change

    def rescale(self, x: torch.Tensor) -> torch.Tensor:
        """``poly(x)`` by Horner's rule, in float32."""
        y = torch.zeros_like(x)
        for c in self.config.coefficients:
            y = y * x + c
        return y

    def decide(self, step, num_steps, state, signal=None):
        s, fresh = advance_step(step, num_steps)
        rel = relative(signal[0])
        forced = (s <= max(1, self.config.warmup_steps)) | (s == num_steps)
        acc = torch.where(fresh, torch.zeros_like(state["tea_acc"]), state["tea_acc"]) + self.rescale(rel)
        acc = torch.where(forced, torch.zeros_like(acc), acc)
        compute = forced | ~(acc < self.config.threshold)  # a NaN accumulator computes (and resets)
        return s, compute, {"tea_rel": rel, "tea_acc": acc}

    def update(self, s, compute, parts, state, num_steps):
        rel, acc = state["tea_rel"], state["tea_acc"]
        return ({"tea_rel": rel, "tea_acc": torch.where(compute, torch.zeros_like(acc), acc)},
                {"rel": nan_where_not(s > 1, rel), "acc": acc})
