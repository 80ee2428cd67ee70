"""A plain-Python AdaCache reference: eager, hook-free, float64, written for reading.

``schedule(trajectory, ...)`` replays the decision rule on a recorded residual trajectory
(``trajectory[s - 1]`` is the metric residual that step ``s`` would produce if it computed) and returns
the 1-based steps that compute.
"""

from __future__ import annotations

import torch


def l1(t: torch.Tensor) -> float:
    return float(t.double().abs().sum())


def lookup(codebook: dict, c: float) -> int:
    for threshold, rate in codebook.items():
        if c < threshold:
            return rate
    return list(codebook.values())[-1]


def motion(p: torch.Tensor, batch: int, frames: int, strides) -> float:
    q = p.double().reshape(batch, frames, -1)
    values = []
    for i in strides:
        later, earlier = q[:, i:], q[:, :-i]
        values.append(l1(later - earlier) / (l1(later) + l1(earlier)))
    return sum(values) / len(values)


def schedule(trajectory, num_steps, codebook, moreg=None, batch=1, frames=None, return_metrics=False,
             warmup_steps=0):
    rate, next_compute, m_prev, p_prev = 1, 1, 1.0, None
    computed, metrics = [], []
    for s in range(1, num_steps + 1):
        if not (s <= max(1, warmup_steps) or s >= num_steps - 1 or s >= next_compute):
            continue
        p = trajectory[s - 1]
        if p_prev is not None:
            since = s - computed[-1]  # the rate that scheduled s, unless s was forced
            c = l1(p - p_prev) / l1(p_prev) / since
            if moreg is not None:
                first, last = moreg.window_for(num_steps)
                a, b, d = moreg.power
                m = ((motion(p, batch, frames, moreg.strides) / a) ** b) / d if first <= s <= last else 1.0
                gradient = moreg.grad_scale * (m - m_prev) / since
                m_prev = m
                c = c * (m + abs(gradient))
            rate = lookup(codebook, c)
            metrics.append((s, c))
        p_prev = p
        next_compute = s + rate
        computed.append(s)
    return (computed, metrics) if return_metrics else computed
