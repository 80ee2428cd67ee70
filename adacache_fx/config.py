"""What every policy's config shares (:class:`CacheConfig`), and its dict round trip.

Each policy's own config lives with its rule in :mod:`adacache_fx.policies` (``AdaCacheConfig`` and
``MoRegConfig`` in ``policies/adacache.py``, ``MagCacheConfig`` in ``policies/magcache.py``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from .state import check_num_steps

GRANULARITIES = ("stack", "block", "branch")
BATCH_DECISIONS = ("shared", "per_sample")
#: Version of the dictionaries written by ``to_dict``; ``from_dict`` reads this version.
CONFIG_VERSION = 1

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
        batch_decisions: ``"shared"`` (the default): a batch shares one decision per step, its metric
            summed over the batch (as the official code decides a batched CFG pair). ``"per_sample"``:
            each batch row (dimension 0 of the cached values) has its own decisions, metric, caches
            and history, and computes and skips as that video alone would; the region computes when
            any row needs it (every policy, MoReg included; no forecast yet). ``report(model)`` then
            gives one report per row.
    """

    num_steps: int | None = None
    metric_block: int | Sequence[int] | None = None
    metric_branch: int = 0
    granularity: str = "stack"
    warmup_steps: int = 0
    extrapolation_order: int = 0
    forecast_gain: float | str = 1.0
    static_inputs: Sequence[str] = ()
    batch_decisions: str = "shared"

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
        if self.batch_decisions not in BATCH_DECISIONS:
            raise ValueError(f"batch_decisions must be one of {BATCH_DECISIONS}, got {self.batch_decisions!r}")

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
