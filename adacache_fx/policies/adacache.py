"""AdaCache's decision rule as a :class:`~adacache_fx.policies.base.Policy` (tensor code in the graph).

Semantics (AdaCache, Kahatapitiya et al. 2024, as in the official Open-Sora implementation):

* Steps are counted 1..N within a generation; steps 1, N-1 and N always compute, and so do steps
  1..``warmup_steps``.
* A cache rate r starts at 1. After a compute step s the next compute step is s + r; the steps in
  between reuse the cached residuals.
* At every compute step after the first, the metric residual p (by default the first residual branch,
  usually self-attention, of the middle block) is compared with the one cached at the previous compute
  step: ``c = ||p - p_prev||_1 / ||p_prev||_1 / r_prev``, summed over all elements, with ``r_prev`` the
  number of steps since that compute step (the rate that scheduled this step, unless the step was forced
  by the warm-up or by N - 1). Several metric sites average their distances.
* With motion regularization (MoReg), the motion of p is measured between frames ``i`` apart:
  ``m_i = ||p[:, i:] - p[:, :-i]||_1 / (||p[:, i:]||_1 + ||p[:, :-i]||_1)`` on p laid out as
  ``[B, T, ...]``, averaged over the strides. Inside the step window (default ``(k, N - k)``,
  ``k = N // 12 + 2``: the official ``(4, 26)`` at 30 steps, ``(10, 90)`` at 100), ``m = ((m / a) ** b) / d``, else
  ``m = 1``; the motion gradient ``g = k * (m - m_prev) / r_prev`` (m_prev starts at 1 and keeps the
  last regularized-before-gradient m), then ``c = c * (m + |g|)``.
* The codebook ``{threshold: rate}`` (thresholds increasing) gives the new rate: the rate of the first
  threshold with ``c < threshold``, else the last rate (also for a NaN c, as in the official code).
* A forced schedule (``compute_steps``) replaces all of this with a fixed set of compute steps.
* A cached step adds the residual of the last compute step; with ``extrapolation_order=1`` it adds
  ``r_last + w * (r_last - r_prev)``, ``w = (s - s_last) / (s_last - s_prev)`` over the last two compute
  steps (``w = 0`` until two steps computed).

All metrics are computed in float32 whatever the model dtype. The per-step history rows are
``(computed, c, m, rate)`` (:data:`~adacache_fx.state.HISTORY_COLUMNS`) with NaN for c and m where no
metric was computed. The metric parts of a site are ``(||p - p_prev||_1, ||p_prev||_1)``, followed at
the MoReg site by ``(||later - earlier||_1, ||later||_1 + ||earlier||_1)`` per stride.
"""

from __future__ import annotations

import torch
from torch import nn

from ..parallel import SequenceShard, preceding
from ..state import StateSpec
from .base import Policy, advance_step


class StepBegin(nn.Module):
    """Top of the graph: advance the step counter and decide whether this step computes.

    Returns ``(s, compute, rate, next_compute, m_prev)``. A new generation starts when no step was done
    yet (step 0, after a reset) or the last one finished (step >= N).
    """

    def __init__(self, compute_steps: tuple[int, ...] | None = None, warmup_steps: int = 0):
        super().__init__()
        self.forced = compute_steps is not None
        self.warmup_steps = warmup_steps
        steps = torch.tensor(compute_steps if self.forced else [], dtype=torch.int64)
        self.register_buffer("compute_steps", steps, persistent=False)

    def forward(self, step, num_steps, rate, next_compute, m_prev):
        s, fresh = advance_step(step, num_steps)
        one = torch.ones_like(step)
        rate = torch.where(fresh, one, rate)
        next_compute = torch.where(fresh, one, next_compute)
        m_prev = torch.where(fresh, torch.ones_like(m_prev), m_prev)
        if self.forced:
            compute = (self.compute_steps == s).any()
        else:
            compute = (s <= max(1, self.warmup_steps)) | (s >= num_steps - 1) | (s >= next_compute)
        return s, compute, rate, next_compute, m_prev


class ResidualDistance(nn.Module):
    """Parts ``(||p - p_prev||_1, ||p_prev||_1)`` of the relative L1 distance, in float32."""

    def forward(self, p, p_prev):
        p, p_prev = p.float(), p_prev.float()
        return torch.stack([(p - p_prev).abs().sum(), p_prev.abs().sum()])


class MotionMagnitude(nn.Module):
    """Parts of the raw MoReg motion of a residual laid out as ``[batch, frames, ...]``: per stride ``i``,
    ``(||p[:, i:] - p[:, :-i]||_1, ||p[:, i:]||_1 + ||p[:, :-i]||_1)``.

    Under context parallelism (``shard``) ``p`` is this rank's chunk of the sequence: each batch row a
    contiguous run of the flattened ``[frames, ...]`` row. The parts are then this rank's share of the
    sums (the pairs whose later element it holds; the earlier ones from the ranks before it come from
    :func:`~adacache_fx.parallel.preceding`), so that summed over the ranks they are the whole ones."""

    def __init__(self, batch: int, frames: int, strides: tuple[int, ...], shard: SequenceShard | None = None):
        super().__init__()
        self.batch, self.frames, self.strides, self.shard = batch, frames, tuple(strides), shard

    def forward(self, p):
        if self.shard is not None:
            return self._sharded(p.float().reshape(self.batch, -1))
        q = p.float().reshape(self.batch, self.frames, -1)
        parts = []
        for i in self.strides:
            later, earlier = q[:, i:], q[:, :-i]
            parts += [(later - earlier).abs().sum(), later.abs().sum() + earlier.abs().sum()]
        return torch.stack(parts)

    def _sharded(self, q):
        n = q.shape[1]  # this rank's elements of each row, starting at `start` of `size`
        size, start = n * self.shard.world, n * self.shard.rank
        per_frame = size // self.frames
        before = preceding(q, self.shard, max(self.strides) * per_frame)
        h = before.shape[1]
        extended = torch.cat([before, q], dim=1)  # row elements start - h .. start + n
        parts = []
        for i in self.strides:
            d = i * per_frame  # element e of frame >= i pairs with e - d
            j0 = min(max(d - h, 0), n)  # the first local element whose partner is here (all from frame i on)
            later = q[:, j0:]
            earlier = extended[:, h + j0 - d: h + n - d] if j0 < n else later
            j1 = min(max(size - d - start, 0), n)  # local elements of frames < T - i
            parts += [(later - earlier).abs().sum(), later.abs().sum() + q[:, :j1].abs().sum()]
        return torch.stack(parts)


def relative(parts: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` of a pair of parts, guarded against a zero denominator."""
    return parts[0] / parts[1].clamp_min(1e-12)


class StepEnd(nn.Module):
    """Bottom of the graph: turn the metric into the next rate and schedule, and record history.

    Returns ``(step, rate, next_compute, m_prev, history)``.
    """

    def __init__(self, codebook: dict[float, int], moreg=None):
        super().__init__()
        thresholds = torch.tensor(list(codebook.keys()), dtype=torch.float32)
        rates = torch.tensor(list(codebook.values()), dtype=torch.int64)
        self.register_buffer("thresholds", thresholds, persistent=False)
        self.register_buffer("rates", rates, persistent=False)
        self.moreg = moreg

    def forward(self, s, compute, distance, motion, rate, next_compute, m_prev, history):
        has_metric = compute & (s > 1)
        since = (s - (next_compute - rate)).clamp_min(1).to(torch.float32)  # steps since the last compute step
        c = distance / since
        m = torch.ones_like(c)
        if self.moreg is not None:
            first, last = self.moreg.window_for(history.shape[0])  # the history has N rows
            a, b, d = self.moreg.power
            in_window = (s >= first) & (s <= last)
            m = torch.where(in_window, ((motion / a) ** b) / d, m)
            grad = self.moreg.grad_scale * (m - m_prev) / since
            m_prev = torch.where(has_metric, m, m_prev)
            m = m + grad.abs()
            c = c * m
        last = self.rates.numel() - 1
        index = (c >= self.thresholds).sum().clamp(max=last)
        index = torch.where(torch.isnan(c), torch.full_like(index, last), index)  # NaN: the last rate, as the
        # official if/elif/else does (c compares false with every threshold and falls through to else)
        rate = torch.where(has_metric, self.rates.index_select(0, index.reshape(1)).reshape(()), rate)
        next_compute = torch.where(compute, s + rate, next_compute)
        nan = torch.full_like(c, float("nan"))
        row = torch.stack(
            [compute.to(torch.float32), torch.where(has_metric, c, nan), torch.where(has_metric, m, nan),
             rate.to(torch.float32)]
        )
        history = history.index_copy(0, (s - 1).reshape(1), row.reshape(1, -1))
        return s, rate, next_compute, m_prev, history


class AdaCachePolicy(Policy):
    """AdaCache (with optional MoReg and a forced schedule), as configured by an ``AdaCacheConfig``."""

    def __init__(self, config, num_sites: int, frame_layout: tuple[int, int] | None = None,
                 shard: SequenceShard | None = None):
        super().__init__()
        self.num_sites = num_sites
        self.begin_step = StepBegin(config.compute_steps, config.warmup_steps)
        self.end_step = StepEnd(dict(config.codebook), config.moreg)
        self.distance = ResidualDistance()
        self.motion = None
        if config.moreg is not None:
            batch, frames = frame_layout
            self.motion = MotionMagnitude(batch, frames, config.moreg.strides, shard)  # at metric site 0

    def state_specs(self) -> tuple[StateSpec, ...]:
        return (StateSpec("rate", (), torch.int64, 1), StateSpec("next_compute", (), torch.int64, 1),
                StateSpec("m_prev", (), torch.float32, 1.0))

    def num_parts(self, site: int) -> int:
        return 2 + (2 * len(self.motion.strides) if self.motion is not None and site == 0 else 0)

    def decide(self, step, num_steps, state):
        s, compute, rate, next_compute, m_prev = self.begin_step(
            step, num_steps, state["rate"], state["next_compute"], state["m_prev"]
        )
        return s, compute, {"rate": rate, "next_compute": next_compute, "m_prev": m_prev}

    def measure(self, site, p, p_prev):
        parts = self.distance(p, p_prev)
        if self.motion is not None and site == 0:
            parts = torch.cat([parts, self.motion(p)])
        return parts

    def update(self, s, compute, parts, state, history):
        distances = [relative(part[:2]) for part in parts]
        distance = distances[0] if len(distances) == 1 else torch.stack(distances).mean()
        motion = distance
        if self.motion is not None:
            motion = torch.zeros((), dtype=torch.float32, device=distance.device)
            strides = parts[0][2:].reshape(-1, 2)
            for i in range(strides.shape[0]):
                motion = motion + relative(strides[i])
            motion = motion / strides.shape[0]
        _, rate, next_compute, m_prev, history = self.end_step(
            s, compute, distance, motion, state["rate"], state["next_compute"], state["m_prev"], history
        )
        return {"rate": rate, "next_compute": next_compute, "m_prev": m_prev}, history
