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

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from ..state import StateSpec

aten = torch.ops.aten


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


class Forecast:
    """What a cached step adds, as graph code: order 0 (:class:`Reuse`) adds the cached residual, and
    keeps no state and takes no operands; :class:`Linear` and :class:`Quadratic` forecast it from the
    last two or three compute steps. ``gain``: the config's ``forecast_gain`` (a share, or ``"fit"``).

    The rewrite asks a forecast for its state (:meth:`state_specs`), the extra caches it keeps per cached
    tensor (:attr:`history`), the weights a step's cached branches use (:meth:`insert_weights`, top of
    the graph), the value a cached branch adds (:meth:`reuse`), and with a fitted gain the sums a compute
    branch measures (:meth:`gain_parts`) and the gain they refit (:meth:`insert_gain`, bottom)."""

    order = 0
    #: The compute-step records the weights are computed from (state names).
    records: tuple[str, ...] = ()

    def __init__(self, gain: float | str = 1.0):
        self.gain = gain

    @property
    def fit_gain(self) -> bool:
        return self.order >= 1 and self.gain == "fit"

    @property
    def history(self) -> tuple[str, ...]:
        """The caches kept per cached tensor besides the last one: ``prev`` (order >= 1), ``older`` (2)."""
        return ("prev", "older")[: self.order]

    def state_specs(self) -> tuple[StateSpec, ...]:
        return ()

    def weight_module(self) -> nn.Module | None:
        return None

    def insert_weights(self, gm: fx.GraphModule, graph: fx.Graph, after: fx.Node, s: fx.Node, compute: fx.Node,
                       state: dict[str, fx.Node]) -> ForecastNodes:
        """The weights of this step's cached branches, computed after ``after`` (see :class:`ForecastNodes`)."""
        return ForecastNodes()

    def reuse(self, graph: fx.Graph, cache: fx.Node, prev: fx.Node | None, older: fx.Node | None,
              weights: list[fx.Node], dtype) -> fx.Node:
        """The value a cached step uses: ``cache``; ``cache + w (cache - prev)`` with a linear forecast;
        ``cache + u (cache - prev) + v (prev - older)`` with a quadratic one."""
        if prev is None or not dtype.is_floating_point:
            return cache
        value = cache
        for term in forecast_terms(graph, cache, prev, older, weights, dtype):
            value = graph.call_function(aten.add.Tensor, (value, term))
        return value

    def gain_parts(self, graph: fx.Graph, new, caches, previous, older, weights) -> fx.Node:
        return gain_parts(graph, new, caches, previous, older, weights)

    def insert_gain(self, gm: fx.GraphModule, graph: fx.Graph, parts: list[fx.Node], gain: fx.Node) -> fx.Node:
        """The refitted gain from the regions' summed ``parts`` (``forecast_gain="fit"``)."""
        gm.add_submodule("adacache_forecast_gain", ForecastGain())
        total = parts[0]
        for more in parts[1:]:
            total = graph.call_function(aten.add.Tensor, (total, more))
        return graph.call_module("adacache_forecast_gain", (total, gain))


class Reuse(Forecast):
    """Order 0: a cached step adds the cached residual (AdaCache)."""


class Linear(Forecast):
    """Order 1: TaylorSeer's first order over the last two compute steps (:class:`ExtrapolationWeight`)."""

    order = 1
    records = ("last_compute", "prev_compute")

    def state_specs(self) -> tuple[StateSpec, ...]:
        return FORECAST_STATE + (GAIN_STATE if self.fit_gain else ())

    def weight_module(self) -> nn.Module:
        return ExtrapolationWeight()

    def insert_weights(self, gm, graph, after, s, compute, state):
        gm.add_submodule("adacache_extrapolation", self.weight_module())
        with graph.inserting_after(after):
            node = graph.call_module("adacache_extrapolation", (s, compute, *[state[name] for name in self.records]))
        with graph.inserting_before(node.next):
            items = [graph.call_function(operator.getitem, (node, k)) for k in range(self.order + len(self.records))]
        raw = items[: self.order]
        records = dict(zip(self.records, items[self.order:]))
        if self.gain == 1.0:
            return ForecastNodes(raw, raw, records)
        with graph.inserting_before(items[-1].next):
            gain = self.gain
            if self.fit_gain:  # a new generation starts from the whole forecast again
                fitted = state["forecast_gain"]
                first = graph.call_function(aten.eq.Scalar, (s, 1))
                gain = graph.call_function(aten.where.self, (first, graph.call_function(
                    aten.full_like.default, (fitted, 1.0)), fitted))
            weights = [graph.call_function(aten.mul.Tensor, (w, gain)) for w in raw]
        return ForecastNodes(weights, raw, records, gain if self.fit_gain else None)


class Quadratic(Linear):
    """Order 2: TaylorSeer's second order over the last three compute steps (:class:`TaylorWeights`)."""

    order = 2
    records = ("last_compute", "prev_compute", "older_compute")

    def state_specs(self) -> tuple[StateSpec, ...]:
        return FORECAST_STATE + SECOND_ORDER_STATE + (GAIN_STATE if self.fit_gain else ())

    def weight_module(self) -> nn.Module:
        return TaylorWeights()


def forecast_for(config) -> Forecast:
    """The forecast of ``config.extrapolation_order`` with its ``forecast_gain``."""
    return (Reuse, Linear, Quadratic)[config.extrapolation_order](config.forecast_gain)


@dataclass
class ForecastNodes:
    """What :meth:`Forecast.insert_weights` put in the graph: ``weights`` the cached branches use (times a
    fixed gain), ``raw`` the weights before the gain (a fitted gain compares with them), ``records`` the
    updated compute-step records (state), ``gain`` the gain in force this step (``forecast_gain="fit"``)."""

    weights: list = field(default_factory=list)
    raw: list = field(default_factory=list)
    records: dict = field(default_factory=dict)
    gain: fx.Node | None = None


def forecast_terms(graph: fx.Graph, cache: fx.Node, prev: fx.Node, older: fx.Node | None, weights: list[fx.Node],
                   dtype) -> list[fx.Node]:
    """What a forecast adds to ``cache``, in ``dtype``: ``[w * (cache - prev)]``, and ``v * (prev - older)``
    with a quadratic one."""

    def term(a, b, weight):
        weight = graph.call_function(aten._to_copy.default, (weight,), {"dtype": dtype})
        return graph.call_function(aten.mul.Tensor, (graph.call_function(aten.sub.Tensor, (a, b)), weight))

    return [term(cache, prev, weights[0])] + ([term(prev, older, weights[1])] if older is not None else [])


def gain_parts(graph: fx.Graph, new: list[fx.Node], caches: list[fx.Node], previous: list[fx.Node],
               older: list[fx.Node | None], weights: list[fx.Node]) -> fx.Node:
    """``[sum <n - c, d>, sum ||d||^2]`` over the cached tensors, all in float32: the sums the forecast
    gain is fitted from (``n`` this step's, ``c`` the cached, ``d = w (c - p) [+ v (p - o)]`` the change the
    forecast adds, computed in float32 so that a bf16 cache's rounding does not count as a change)."""
    from ..passes.graph_utils import PassError

    if not caches:
        raise PassError("forecast_gain='fit' needs a floating-point cached tensor in every region", "insert_cache")

    def f32(node):
        return graph.call_function(aten._to_copy.default, (node,), {"dtype": torch.float32})

    dot = norm = None
    for n, c, p, o in zip(new, caches, previous, older):
        c32 = f32(c)
        err = graph.call_function(aten.sub.Tensor, (f32(n), c32))
        step, *more = forecast_terms(graph, c32, f32(p), None if o is None else f32(o), weights, torch.float32)
        for term in more:
            step = graph.call_function(aten.add.Tensor, (step, term))
        d = graph.call_function(aten.sum.default, (graph.call_function(aten.mul.Tensor, (err, step)),))
        q = graph.call_function(aten.sum.default, (graph.call_function(aten.mul.Tensor, (step, step)),))
        dot = d if dot is None else graph.call_function(aten.add.Tensor, (dot, d))
        norm = q if norm is None else graph.call_function(aten.add.Tensor, (norm, q))
    return graph.call_function(aten.stack.default, ([dot, norm],))
