"""Typed configuration objects for the AdaCache transform."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from .state import check_num_steps

GRANULARITIES = ("stack", "block", "branch")
#: Version of the dictionaries written by ``to_dict``; ``from_dict`` reads this version.
CONFIG_VERSION = 1


def _default_codebook() -> dict[float, int]:
    from .presets import FAST_30

    return dict(FAST_30)


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


#: Forecast orders a cached step can use (``CacheConfig.extrapolation_order``).
FORECAST_ORDERS = (0, 1, 2)


@dataclass(frozen=True)
class CacheConfig:
    """What every caching policy's config has: where the cache sits and what a cached step adds.

    A policy's config subclasses this and adds its decision rule's parameters; ``transform`` picks the
    policy registered for the config's type (see :mod:`adacache_fx.policies`).

    Args:
        num_steps: denoising steps N of a generation; may also be given later with
            :func:`adacache_fx.reset` or by :func:`adacache_fx.enable` from the pipeline call.
        metric_block: index of the block (execution order, from 0) whose residual drives the
            decision; ``None`` is the middle block. A sequence averages several blocks.
        metric_branch: index of the residual branch inside that block (0: the first, usually
            self-attention).
        granularity: ``"stack"`` (one cached region over the block stack, the default),
            ``"block"`` (every block its own region) or ``"branch"`` (every residual branch its own
            region, caching the branch output ``f`` as AdaCache does per branch).
        warmup_steps: the first ``warmup_steps`` steps always compute (the metric is still measured on
            them, so the schedule after them follows it); early steps shape the video most.
        extrapolation_order: what a cached step adds. ``0`` (AdaCache): the residual of the last
            compute step, unchanged. ``1``: that residual extrapolated linearly from the last two
            compute steps, ``r_last + (s - s_last) / (s_last - s_prev) * (r_last - r_prev)`` (the
            first-order forecast of TaylorSeer, here inside the graph); keeps a second residual per
            cached tensor, so the cache memory doubles. ``2``: TaylorSeer's second order over the last
            three compute steps (see :mod:`adacache_fx.policies.forecast`); keeps three residuals per
            cached tensor. The schedule is decided as with ``0``.
        forecast_gain: how much of the forecast's change a cached step adds (``extrapolation_order``
            >= 1): ``1.0`` the whole forecast (TaylorSeer's); a float in ``[0, 1]`` a fixed share
            (``0.5``: half-way between reuse and the forecast); ``"fit"``: fitted to this video on every
            compute step ``s``: the least-squares gain ``clamp(<r_s - r_l, f_s - r_l> / ||f_s - r_l||^2,
            0, 1)`` with which the forecast ``f_s`` from the earlier compute steps would have best
            predicted this step's residual ``r_s`` (``r_l``: the last compute step's), sums over every
            cached tensor in float32; the cached steps up to the next compute step use it (1.0 from the
            start of every generation until its first fit).
        static_inputs: names of small tensor inputs the model reads on the host (``height``, ``fps``;
            ``arg2`` for a positional one): their values are constants of each capture and part of its
            input signature, like shapes. Such inputs are also found automatically when the export
            needs them; naming them saves that first failed export.
    """

    num_steps: int | None = None
    metric_block: int | Sequence[int] | None = None
    metric_branch: int = 0
    granularity: str = "stack"
    warmup_steps: int = 0
    extrapolation_order: int = 0
    forecast_gain: float | str = 1.0
    static_inputs: Sequence[str] = ()

    #: MoReg settings; only policies that regulate by motion set it (``AdaCacheConfig``).
    moreg = None

    def __post_init__(self):
        if self.num_steps is not None:
            check_num_steps(self.num_steps)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.extrapolation_order not in FORECAST_ORDERS:
            raise ValueError(f"extrapolation_order must be one of {FORECAST_ORDERS} "
                             f"(0 reuse, 1 linear, 2 quadratic), got {self.extrapolation_order!r}")
        gain = self.forecast_gain
        if gain != "fit":
            if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 <= gain <= 1:
                raise ValueError(f"forecast_gain must be a number in [0, 1] or 'fit', got {gain!r}")
            object.__setattr__(self, "forecast_gain", float(gain))
        if self.extrapolation_order == 0 and self.forecast_gain != 1.0:
            raise ValueError("forecast_gain needs a forecast: set extrapolation_order to 1 or 2")
        if self.metric_branch < 0:
            raise ValueError(f"metric_branch must be >= 0, got {self.metric_branch}")
        if self.metric_block is not None and not isinstance(self.metric_block, int):
            object.__setattr__(self, "metric_block", tuple(int(b) for b in self.metric_block))
        if isinstance(self.static_inputs, str) or not all(isinstance(n, str) for n in self.static_inputs):
            raise TypeError(f"static_inputs must be a sequence of input names, got {self.static_inputs!r}")
        object.__setattr__(self, "static_inputs", tuple(self.static_inputs))

    def to_dict(self) -> dict:
        """A JSON-compatible dict (``json.dumps`` writes the ``inf`` of a catch-all threshold as
        ``Infinity``) that :meth:`from_dict` (or :func:`config_from_dict`) turns back into an equal config.

        >>> import adacache_fx
        >>> config = adacache_fx.AdaCacheConfig(num_steps=30, moreg=adacache_fx.MoRegConfig())
        >>> adacache_fx.AdaCacheConfig.from_dict(config.to_dict()) == config
        True
        """
        data = {"type": type(self).__name__, "version": CONFIG_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, Mapping):
                value = [[k, v] for k, v in value.items()]
            elif isinstance(value, tuple):
                value = list(value)
            data[f.name] = value
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> CacheConfig:
        """The config :meth:`to_dict` wrote (same type and version)."""
        data = dict(data)
        kind, version = data.pop("type", None), data.pop("version", None)
        if kind != cls.__name__ or version != CONFIG_VERSION:
            raise ValueError(
                f"not a {cls.__name__} dict of version {CONFIG_VERSION}: type {kind!r}, version {version!r}"
            )
        _check_keys(cls, data)
        if isinstance(data.get("metric_block"), list):
            data["metric_block"] = tuple(data["metric_block"])
        return cls(**cls._decode_fields(data))

    @classmethod
    def _decode_fields(cls, data: dict) -> dict:
        """Subclasses turn their JSON field values back into Python ones here."""
        return data

    @property
    def metric_blocks(self) -> tuple[int, ...] | None:
        if self.metric_block is None:
            return None
        if isinstance(self.metric_block, int):
            return (self.metric_block,)
        return tuple(int(b) for b in self.metric_block)


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

    codebook: Mapping[float, int] = field(default_factory=_default_codebook)
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


def config_from_dict(data: Mapping) -> CacheConfig:
    """The config of any :class:`CacheConfig` subclass from the dict its ``to_dict`` wrote."""
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    kind = data.get("type")
    for cls in (CacheConfig, *subclasses(CacheConfig)):
        if cls.__name__ == kind:
            return cls.from_dict(data)
    raise ValueError(f"unknown config type {kind!r}")


def _check_keys(cls, data: Mapping) -> None:
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")


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
