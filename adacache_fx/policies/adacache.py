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

All metrics are computed in float32 whatever the model dtype. The history columns are ``metric`` (c),
``motion`` (m) and ``rate``, NaN for c and m where no metric was computed. The metric parts of a site are ``(||p - p_prev||_1, ||p_prev||_1)``, followed at
the MoReg site by ``(||later - earlier||_1, ||later||_1 + ||earlier||_1)`` per stride.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import presets
from ..config import CacheConfig, _check_keys
from ..parallel import SequenceShard, preceding
from ..state import StateSpec
from .base import FrameNeeds, Needs, Policy
from .common import advance_step, distance_parts, lookup, mean_distance, nan_where_not, relative
from .registry import register_policy


@dataclass(frozen=True)
class MoRegConfig:
    """Motion regularization (MoReg): spend more compute on videos with more motion.

    Args:
        strides: frame strides ``i`` of the motion metric (averaged).
        window: inclusive 1-based step window in which the motion metric is active; outside it m = 1.
            ``None`` (default) scales it with N: ``(k, N - k)`` with ``k = N // 12 + 2`` (see
            :meth:`window_for`), which gives the official ``(4, 26)`` at 30 steps and ``(10, 90)`` at 100.
        power: ``(a, b, d)`` of the normalization ``m = ((m / a) ** b) / d``.
        grad_scale: ``k`` of the motion gradient ``g = k * (m - m_prev) / r_prev``.
        frames: number of latent frames T at the metric location; ``None`` infers it from the patch
            embedding of the captured graph.
    """

    strides: tuple[int, ...] = (1,)
    window: tuple[int, int] | None = None
    power: tuple[float, float, float] = (0.385, 8.0, 1.0)
    grad_scale: float = 10.0
    frames: int | None = None

    def __post_init__(self):
        strides = tuple(int(s) for s in self.strides)
        if not strides or min(strides) < 1:
            raise ValueError(f"MoRegConfig.strides must be positive frame strides, got {self.strides!r}")
        object.__setattr__(self, "strides", strides)
        if self.window is not None and (len(self.window) != 2 or self.window[0] > self.window[1]):
            raise ValueError(
                f"MoRegConfig.window must be (first, last) with first <= last, or None, got {self.window!r}"
            )
        if len(self.power) != 3 or self.power[0] <= 0 or self.power[2] == 0:
            raise ValueError(f"MoRegConfig.power must be (a, b, d) with a > 0 and d != 0, got {self.power!r}")
        if self.frames is not None and self.frames < 2:
            raise ValueError(f"MoRegConfig.frames must be >= 2 (motion needs frames), got {self.frames}")
        if self.window is not None:
            object.__setattr__(self, "window", (int(self.window[0]), int(self.window[1])))
        object.__setattr__(self, "power", tuple(float(p) for p in self.power))
        object.__setattr__(self, "grad_scale", float(self.grad_scale))

    def window_for(self, num_steps):
        """The ``(first, last)`` step window for N = ``num_steps``: the one set, else ``(k, N - k)`` with
        ``k = N // 12 + 2`` (integer arithmetic, so it also runs on a symbolic N inside a graph)."""
        if self.window is not None:
            return self.window
        k = num_steps // 12 + 2
        return k, num_steps - k

    def to_dict(self) -> dict:
        """A JSON-compatible dict that :meth:`from_dict` turns back into an equal config."""
        window = None if self.window is None else list(self.window)
        return {"strides": list(self.strides), "window": window, "power": list(self.power),
                "grad_scale": self.grad_scale, "frames": self.frames}

    @classmethod
    def from_dict(cls, data: Mapping) -> MoRegConfig:
        _check_keys(cls, data)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class AdaCacheConfig(CacheConfig):
    """AdaCache: the cache rate follows the change of a block's residual (the paper's rule).

    Takes every :class:`CacheConfig` argument (``num_steps``, ``metric_block``, ``metric_branch``,
    ``granularity``, ``warmup_steps``, ``extrapolation_order``, ``static_inputs``) and:

    Args:
        codebook: ordered map ``{threshold: rate}``; the new cache rate is the rate of the first
            threshold with ``c < threshold``, else the last rate. Default: ``presets.FAST_30``.
        moreg: optional :class:`MoRegConfig`.
        compute_steps: a forced schedule: the 1-based steps that compute; every other step reuses
            the cache. Replaces the adaptive policy; must contain step 1.
    """

    codebook: Mapping[float, int] = field(default_factory=lambda: dict(presets.FAST_30))
    moreg: MoRegConfig | None = None
    compute_steps: Sequence[int] | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "codebook", validate_codebook(self.codebook))
        if self.warmup_steps and self.compute_steps is not None:
            raise ValueError("warmup_steps does not apply to a forced schedule: put those steps in compute_steps")
        if self.compute_steps is not None:
            steps = tuple(sorted({int(s) for s in self.compute_steps}))
            if not steps or steps[0] != 1:
                raise ValueError("compute_steps must contain step 1: the first step has nothing cached")
            object.__setattr__(self, "compute_steps", steps)
        if self.moreg is not None and not isinstance(self.moreg, MoRegConfig):
            raise TypeError(f"moreg must be a MoRegConfig or None, got {type(self.moreg).__name__}")

    @classmethod
    def _decode_fields(cls, data: dict) -> dict:
        if "codebook" in data:
            data["codebook"] = {float(t): int(r) for t, r in data["codebook"]}
        if data.get("moreg") is not None:
            data["moreg"] = MoRegConfig.from_dict(data["moreg"])
        return data


def validate_codebook(codebook: Mapping[float, int]) -> dict[float, int]:
    """Check a ``{threshold: rate}`` codebook: non-empty, thresholds increasing, rates positive ints."""
    if isinstance(codebook, Mapping):
        items = list(codebook.items())
    else:
        raise TypeError(f"codebook must be a mapping {{threshold: rate}}, got {type(codebook).__name__}")
    if not items:
        raise ValueError("codebook is empty: give at least one {threshold: rate} entry")
    thresholds = [float(t) for t, _ in items]
    if any(math.isnan(t) or t <= 0 for t in thresholds):
        raise ValueError(f"codebook thresholds must be positive, got {thresholds}")
    if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
        raise ValueError(f"codebook thresholds must be strictly increasing, got {thresholds}")
    rates = []
    for _, r in items:
        if isinstance(r, bool) or int(r) != r or int(r) < 1:
            raise ValueError(f"codebook rates must be integers >= 1, got {[r for _, r in items]}")
        rates.append(int(r))
    return dict(zip(thresholds, rates))


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
            compute = (self.compute_steps == s.unsqueeze(-1)).any(-1)
        else:
            compute = (s <= max(1, self.warmup_steps)) | (s >= num_steps - 1) | (s >= next_compute)
        return s, compute, rate, next_compute, m_prev


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


class StepEnd(nn.Module):
    """Bottom of the graph: turn the metric into the next rate and schedule.

    Returns ``(rate, next_compute, m_prev, c, m)``, ``c`` and ``m`` as this step measured them.
    """

    def __init__(self, codebook: dict[float, int], moreg=None):
        super().__init__()
        thresholds = torch.tensor(list(codebook.keys()), dtype=torch.float32)
        rates = torch.tensor(list(codebook.values()), dtype=torch.int64)
        self.register_buffer("thresholds", thresholds, persistent=False)
        self.register_buffer("rates", rates, persistent=False)
        self.moreg = moreg

    def forward(self, s, compute, distance, motion, rate, next_compute, m_prev, num_steps):
        has_metric = compute & (s > 1)
        since = (s - (next_compute - rate)).clamp_min(1).to(torch.float32)  # steps since the last compute step
        c = distance / since
        m = torch.ones_like(c)
        if self.moreg is not None:
            first, last = self.moreg.window_for(num_steps)
            a, b, d = self.moreg.power
            in_window = (s >= first) & (s <= last)
            m = torch.where(in_window, ((motion / a) ** b) / d, m)
            grad = self.moreg.grad_scale * (m - m_prev) / since
            m_prev = torch.where(has_metric, m, m_prev)
            m = m + grad.abs()
            c = c * m
        last = self.rates.numel() - 1
        index = (c.unsqueeze(-1) >= self.thresholds).sum(-1).clamp(max=last)
        index = torch.where(torch.isnan(c), torch.full_like(index, last), index)  # NaN: the last rate, as the
        # official if/elif/else does (c compares false with every threshold and falls through to else)
        rate = torch.where(has_metric, lookup(self.rates, index), rate)
        next_compute = torch.where(compute, s + rate, next_compute)
        return rate, next_compute, m_prev, c, m


@register_policy(AdaCacheConfig)
class AdaCachePolicy(Policy):
    """AdaCache (with optional MoReg and a forced schedule), as configured by an ``AdaCacheConfig``."""

    history_columns = ("metric", "motion", "rate")
    checked_column = "metric"

    def __init__(self, config: AdaCacheConfig, facts=None):
        super().__init__(config, facts)
        self.begin_step = StepBegin(config.compute_steps, config.warmup_steps)
        self.end_step = StepEnd(dict(config.codebook), config.moreg)
        self.motion = None
        if config.moreg is not None:
            batch, frames = self.facts.frame_layout
            self.motion = MotionMagnitude(batch, frames, config.moreg.strides, self.facts.shard)  # at metric site 0

    @classmethod
    def needs(cls, config) -> Needs:
        moreg = config.moreg
        return Needs(frames=None if moreg is None else FrameNeeds(moreg.frames, max(moreg.strides)))

    def state_specs(self) -> tuple[StateSpec, ...]:
        return (StateSpec("rate", (), torch.int64, 1), StateSpec("next_compute", (), torch.int64, 1),
                StateSpec("m_prev", (), torch.float32, 1.0))

    def num_parts(self, site: int) -> int:
        return 2 + (2 * len(self.motion.strides) if self.motion is not None and site == 0 else 0)

    def decide(self, step, num_steps, state, signal=None):
        s, compute, rate, next_compute, m_prev = self.begin_step(
            step, num_steps, state["rate"], state["next_compute"], state["m_prev"]
        )
        return s, compute, {"rate": rate, "next_compute": next_compute, "m_prev": m_prev}

    def measure(self, site, p, p_prev):
        parts = distance_parts(p, p_prev)
        if self.motion is not None and site == 0:
            parts = torch.cat([parts, self.motion(p)])
        return parts

    def update(self, s, compute, parts, state, num_steps):
        distance = mean_distance(parts)
        motion = distance
        if self.motion is not None:
            strides = parts[0][..., 2:].unflatten(-1, (-1, 2))
            motion = torch.zeros_like(distance)
            for i in range(strides.shape[-2]):
                motion = motion + relative(strides[..., i, :])
            motion = motion / strides.shape[-2]
        rate, next_compute, m_prev, c, m = self.end_step(
            s, compute, distance, motion, state["rate"], state["next_compute"], state["m_prev"], num_steps
        )
        has_metric = compute & (s > 1)
        row = {"metric": nan_where_not(has_metric, c), "motion": nan_where_not(has_metric, m),
               "rate": rate.to(torch.float32)}
        return {"rate": rate, "next_compute": next_compute, "m_prev": m_prev}, row
