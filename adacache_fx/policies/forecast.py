"""Forecasting: what a cached step adds, for any policy.

Order 0 reuses the residual of the last compute step. Order 1 adds it extrapolated linearly from the last
two compute steps, ``r_last + w * (r_last - r_prev)`` with ``w = (s - s_last) / (s_last - s_prev)``
(TaylorSeer's first order, inside the graph); it keeps a second residual per cached tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..state import StateSpec

#: Forecast orders implemented: 0 (reuse) and 1 (linear).
ORDERS = (0, 1)


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


FORECAST_STATE = (StateSpec("last_compute", (), torch.int64, 0), StateSpec("prev_compute", (), torch.int64, 0))
