"""Forecasting: what a cached step adds, for any policy.

With ``r0, r1, r2`` the residuals of the last three compute steps ``s0 > s1 > s2``, ``k = s - s0`` and
``d0 = s0 - s1``, ``d1 = s1 - s2``, a cached step ``s`` adds:

* order 0: ``r0`` (reuse);
* order 1: ``r0 + w * (r0 - r1)``, ``w = k / d0`` (TaylorSeer's first order); ``w = 0`` until two steps
  computed. Keeps a second residual per cached tensor;
* order 2: ``r0 + u * (r0 - r1) + v * (r1 - r2)``, the second-order Taylor expansion
  ``F0 + k F1 + k**2 / 2 F2`` with TaylorSeer's finite differences as diffusers' ``TaylorSeerState``
  computes them for non-uniform intervals: ``F0 = r0``, ``F1 = (r0 - r1) / d0``, ``F2 = (F1 - F1') / d0``
  with ``F1' = (r1 - r2) / d1`` the first difference of the compute step before (both divided by the
  *latest* interval ``d0``, not by a centred one). So ``u = k / d0 + k**2 / (2 d0**2)`` and
  ``v = -k**2 / (2 d0 d1)``; until three steps computed it is order 1 (``v = 0``, ``u = k / d0``), and
  ``u = v = 0`` until two. Keeps three residuals per cached tensor.

The weights are float32 scalars computed at the top of the graph; a new generation (``s == 1``) forgets
the previous one's compute steps.

``forecast_gain`` (:class:`~adacache_fx.CacheConfig`) multiplies the weights: a constant, or ``"fit"``:
:class:`ForecastGain` refits it on every compute step from two sums the compute branches return, so each
video (and each cache context) gets the share of the forecast that would have predicted its last
compute step best. The sums are over tokens, so under context parallelism they are all-reduced like the
metric parts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..state import StateSpec

#: Forecast orders implemented: 0 (reuse), 1 (linear), 2 (quadratic).
ORDERS = (0, 1, 2)


class ExtrapolationWeight(nn.Module):
    """Weight ``w = (s - s_last) / (s_last - s_prev)`` of the linear residual forecast of a cached step.

    Returns ``(w, last, prev)`` with the compute-step record updated for this step: ``w`` is float32 and 0
    until two steps computed; a new generation (``s == 1``) forgets the previous one's steps.
    """

    def forward(self, s, compute, last, prev):
        fresh = s == 1
        last = torch.where(fresh, torch.zeros_like(last), last)
        prev = torch.where(fresh, torch.zeros_like(prev), prev)
        span = (last - prev).clamp_min(1).to(torch.float32)
        w = torch.where(prev > 0, (s - last).to(torch.float32) / span, torch.zeros((), device=s.device))
        return w, torch.where(compute, s, last), torch.where(compute, last, prev)


class TaylorWeights(nn.Module):
    """Weights ``(u, v)`` of the second-order forecast ``r0 + u (r0 - r1) + v (r1 - r2)`` (module doc).

    Returns ``(u, v, last, prev, older)`` with the compute-step record updated for this step.
    """

    def forward(self, s, compute, last, prev, older):
        fresh = s == 1
        last, prev, older = (torch.where(fresh, torch.zeros_like(t), t) for t in (last, prev, older))
        zero = torch.zeros((), device=s.device)
        k = (s - last).to(torch.float32)
        d0 = (last - prev).clamp_min(1).to(torch.float32)
        d1 = (prev - older).clamp_min(1).to(torch.float32)
        second = older > 0
        u = torch.where(prev > 0, k / d0 + torch.where(second, k * k / (2 * d0 * d0), zero), zero)
        v = torch.where(second, -(k * k) / (2 * d0 * d1), zero)
        return (u, v, torch.where(compute, s, last), torch.where(compute, last, prev),
                torch.where(compute, prev, older))


class ForecastGain(nn.Module):
    """The fitted forecast gain after a step: ``clamp(parts[0] / parts[1], 0, 1)`` where ``parts[1] > 0``
    (a compute step with a forecast to compare: ``parts = [<r - c, f - c>, ||f - c||^2]``), else ``gain``
    (also where a part is not finite: a NaN activation does not poison the rest of the generation)."""

    def forward(self, parts: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        fitted = (parts[0] / parts[1].clamp_min(torch.finfo(torch.float32).tiny)).clamp(0.0, 1.0)
        return torch.where((parts[1] > 0) & torch.isfinite(parts).all(), fitted, gain)


FORECAST_STATE = (StateSpec("last_compute", (), torch.int64, 0), StateSpec("prev_compute", (), torch.int64, 0))
#: The state order 2 keeps besides :data:`FORECAST_STATE`.
SECOND_ORDER_STATE = (StateSpec("older_compute", (), torch.int64, 0),)
#: The state ``forecast_gain="fit"`` keeps: the gain the cached steps use (1.0 until a first fit).
GAIN_STATE = (StateSpec("forecast_gain", (), torch.float32, 1.0),)
