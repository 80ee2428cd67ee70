"""adacache-fx's bench methods: codebooks (preset, scaled, calibrated), static schedules, MagCache's rule
(ratios from ``calibrate_magnitudes``), TeaCache's rule (polynomial from ``calibrate_teacache``, threshold
fitted per target), second-order forecasting, compiled."""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import replace

import torch
from torch import nn

from ... import presets
from ...api import report, transform
from ...calibrate import (
    calibrate_magnitudes,
    fit_codebook,
    fit_plus_threshold,
    fit_teacache_polynomial,
    fit_teacache_threshold,
    max_speedup,
    record_teacache,
)
from ...policies import (
    AdaCacheConfig,
    AdaCachePlusConfig,
    EasyCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    MoRegConfig,
    TeaCacheConfig,
)
from .captions import CALIBRATION_CAPTIONS
from .registry import Setting, register
from .rows import BASELINE

#: ``adacache-calibrated-warm``: warm-up steps (a sixth of N), top rate, linear residual extrapolation.
WARM_FRACTION, WARM_MAX_RATE = 1 / 6, 4
#: ``adacache-plus-forecast`` / ``adacache-magcache-forecast``: the share of the linear forecast a cached
#: step adds (``forecast_gain``).
PLUS_FORECAST_GAIN = 0.5


def _adacache(bench, key: str, method: str, setting: str, config, compiled=False) -> Setting:
    holder: dict[str, nn.Module] = {}

    def enable():
        if "model" not in holder:
            cfg = config() if callable(config) else config
            model = bench.base if cfg is None else transform(bench.base, cfg)
            holder["model"] = torch.compile(model, fullgraph=True) if compiled else model
        model = holder["model"]
        bench.pipe.transformer = model

        def finish():
            bench.pipe.transformer = bench.base
            if model is bench.base or getattr(model, "_orig_mod", None) is bench.base:
                return float(bench.steps)  # uncached (compiled): every step computes
            counts = []
            for context in ("cond", "uncond", "default"):
                with contextlib.suppress(RuntimeError):
                    counts.append(report(model, context).num_computed)
            return float(statistics.mean(counts))

        return finish

    return Setting(key, method, setting, enable, compiled=compiled, probe=False)


def static_schedule(num_steps: int, every: int) -> tuple[int, ...]:
    """Compute steps of the static schedule: every ``every`` steps from step 1, plus steps N-1 and N."""
    return tuple(sorted(set(range(1, num_steps + 1, every)) | {num_steps - 1, num_steps}))


def taylorseer_schedule(num_steps: int, interval: int, warmup: int = 3) -> tuple[int, ...]:
    """Compute steps of diffusers' TaylorSeer (``cache_interval``, ``disable_cache_before_step`` = ``warmup``):
    the first ``warmup`` steps, then every ``interval``-th step after step ``warmup + 1`` (1-based)."""
    return tuple(c + 1 for c in range(num_steps) if c < warmup or (c - warmup - 1) % interval == 0)


def _moreg_window(num_steps: int) -> tuple[int, int]:
    first, last = presets.MOREG_WINDOW_30
    return max(1, round(first * num_steps / 30)), max(1, round(last * num_steps / 30))


@register("adacache-never", "adacache-fx never", full=(), quick=("never",))
def _never(bench, key, method, _):
    return _adacache(bench, key, method, "never skips (exact)",
                     AdaCacheConfig(num_steps=bench.steps, codebook=presets.NEVER))


def _scaled_codebook(bench, key, method, v):
    """The fast or slow preset with every threshold times ``v`` (MoReg for the ``-moreg`` keys)."""
    n = bench.steps
    base = presets.FAST_30 if "fast" in key else presets.SLOW_30
    codebook = {t * v: r for t, r in base.items()}
    moreg = MoRegConfig(window=_moreg_window(n)) if key.endswith("moreg") else None
    return _adacache(bench, key, method, f"thresholds x{v:g}", AdaCacheConfig(num_steps=n, codebook=codebook, moreg=moreg))


for _key, _curve, _full in (
    ("adacache-fast", "adacache-fx fast", (0.5, 1.0, 2.0)),
    ("adacache-fast-moreg", "adacache-fx fast+MoReg", (1.0,)),
    ("adacache-slow", "adacache-fx slow", (0.5, 1.0)),
    ("adacache-slow-moreg", "adacache-fx slow+MoReg", (1.0,)),
):
    register(_key, _curve, full=_full, quick=(1.0,))(_scaled_codebook)


@register("adacache-static", "adacache-fx static", full=(2, 3), quick=(2,))
def _static(bench, key, method, v):
    n = bench.steps
    return _adacache(bench, key, method, f"every {v} steps", AdaCacheConfig(num_steps=n, compute_steps=static_schedule(n, v)))


@register("adacache-taylorseer-schedule", "adacache-fx TaylorSeer schedule", full=(2, 3, 4, 5), quick=(3,))
def _taylorseer_schedule(bench, key, method, v, compiled=False):
    """TaylorSeer's fixed schedule (interval ``v``), a cached step adding the whole linear forecast of the
    stack's residual (TaylorSeer forecasts each block's output)."""
    n = bench.steps
    label = f"interval {v}, order 1" + (", inductor fullgraph" if compiled else "")
    return _adacache(bench, key, method, label,
                     AdaCacheConfig(num_steps=n, compute_steps=taylorseer_schedule(n, v), extrapolation_order=1),
                     compiled=compiled)


register("adacache-taylorseer-schedule-compiled", "adacache-fx TaylorSeer schedule compiled", full=(4, 5, 6, 8, 10),
         quick=(3,))(
    lambda bench, key, method, v: _taylorseer_schedule(bench, key, method, v, compiled=True))


@register("adacache-calibrated", "adacache-fx calibrated", full=("slow", "fast", 2.5, 3.0), quick=(1.5,))
def _calibrated(bench, key, method, v):
    n = bench.steps
    if not isinstance(v, str) and v > max_speedup(n):
        return None
    label = f"target {v}" if isinstance(v, str) else f"target {v:g}x steps"
    return _adacache(bench, key, method, label,
                     lambda: AdaCacheConfig(num_steps=n, codebook=fit_codebook(bench.trajectories(), n, v)))


def _warm(bench, key, method, v, order: int, suffix: str = ""):
    n = bench.steps
    warmup = round(n * WARM_FRACTION)
    if v > max_speedup(n, warmup, WARM_MAX_RATE):
        return None
    return _adacache(
        bench, key, method, f"target {v:g}x steps, warm-up {warmup}, rate <= {WARM_MAX_RATE}{suffix}",
        lambda: AdaCacheConfig(
            num_steps=n, warmup_steps=warmup, extrapolation_order=order,
            codebook=fit_codebook(bench.trajectories(), n, v, warmup, WARM_MAX_RATE)))


@register("adacache-calibrated-warm", "adacache-fx calibrated+warm-up+linear", full=(2.0, 2.25, 2.5), quick=(1.5,))
def _calibrated_warm(bench, key, method, v):
    return _warm(bench, key, method, v, order=1)


@register("adacache-calibrated-warm-taylor2", "adacache-fx calibrated+warm-up+order 2", full=(2.0, 2.5),
          quick=(1.5,))
def _calibrated_warm_taylor2(bench, key, method, v):
    """As ``adacache-calibrated-warm``, with TaylorSeer's second-order forecast."""
    return _warm(bench, key, method, v, order=2, suffix=", order 2")


def magnitudes(bench) -> list[float]:
    """MagCache's ratios from ``adacache_fx.calibrate_magnitudes`` on the held-out captions (once per bench)."""
    if "adacache-mag" not in bench._cal:
        captions = CALIBRATION_CAPTIONS[:1] if bench.quick else CALIBRATION_CAPTIONS
        bench.progress(f"calibrating adacache-fx MagCache ratios on {len(captions)} held-out caption(s)")
        bench._cal["adacache-mag"] = calibrate_magnitudes(bench.pipe, captions, bench.steps)
    return bench._cal["adacache-mag"]


def _magcache(bench, key, method, v, compiled=False, gain=None, max_skip_steps=3, retention_ratio=0.2):
    n = bench.steps
    label = f"threshold {v:g}, K {max_skip_steps}" + (f", retention {retention_ratio:g}" if retention_ratio != 0.2 else "")
    label += ", our calibration" + ("" if gain is None else f", order 1, gain {gain:g}")
    label += ", inductor fullgraph" if compiled else ""
    forecast = {} if gain is None else {"extrapolation_order": 1, "forecast_gain": gain}
    return _adacache(bench, key, method, label,
                     lambda: MagCacheConfig(num_steps=n, mag_ratios=magnitudes(bench), threshold=v,
                                            max_skip_steps=max_skip_steps, retention_ratio=retention_ratio, **forecast),
                     compiled=compiled)


register("adacache-magcache", "adacache-fx MagCache rule", full=(0.06, 0.1, 0.2, 0.3), quick=(0.1,))(_magcache)


@register("adacache-magcache-forecast", "adacache-fx MagCache rule forecast", full=(0.06, 0.2, 0.3), quick=(0.2,))
def _magcache_forecast(bench, key, method, v):
    """MagCache's rule, cached steps adding half the linear forecast's change (as ``adacache-plus-forecast``)."""
    return _magcache(bench, key, method, v, gain=PLUS_FORECAST_GAIN)


@register("adacache-magcache-compiled", "adacache-fx MagCache rule compiled", full=(0.2, 0.5, 1.0, 2.0),
          quick=(0.2,))
def _magcache_compiled(bench, key, method, v):
    """Above threshold 0.2 (where runs of K 3 cap the speedup at ~2.5x compiled), a tenth of the steps
    computed first and runs of 6 (at least 11 of 50 steps compute), of 12 above 0.5 (8 of 50), of 24 above
    1.0."""
    runs = 24 if v > 1.0 else 12 if v > 0.5 else 6
    long_runs = {"max_skip_steps": runs, "retention_ratio": 0.1} if v > 0.2 else {}
    return _magcache(bench, key, method, v, compiled=True, **long_runs)


def teacache_calibration(bench) -> tuple[tuple[float, ...], list[list[float]]]:
    """TeaCache's polynomial (degree 4, fitted as ``adacache_fx.calibrate_teacache``) and the recorded
    signals, on the held-out calibration captions (once per bench)."""
    if "adacache-tea" not in bench._cal:
        captions = CALIBRATION_CAPTIONS[:1] if bench.quick else CALIBRATION_CAPTIONS
        bench.progress(f"calibrating adacache-fx TeaCache polynomial on {len(captions)} held-out caption(s)")
        runs = record_teacache(bench.pipe, captions, bench.steps)
        bench._cal["adacache-tea"] = fit_teacache_polynomial(runs), [signal for signal, _ in runs]
    return bench._cal["adacache-tea"]


def _teacache(bench, key, method, v, gain=None, compiled=False):
    """TeaCache's rule, its threshold fitted for ``v`` x fewer computed steps on the calibration captions."""
    n = bench.steps
    if v > n / 2:  # the first and the last step always compute
        return None
    label = f"target {v:g}x steps, our calibration" + ("" if gain is None else f", order 1, gain {gain:g}")
    label += ", inductor fullgraph" if compiled else ""
    forecast = {} if gain is None else {"extrapolation_order": 1, "forecast_gain": gain}

    def config():
        coefficients, signals = teacache_calibration(bench)
        rule = TeaCacheConfig(num_steps=n, coefficients=coefficients, **forecast)
        return replace(rule, threshold=fit_teacache_threshold(signals, rule, v))

    return _adacache(bench, key, method, label, config, compiled=compiled)


register("adacache-teacache", "adacache-fx TeaCache rule", full=(1.5, 2.0, 2.5, 3.0), quick=(1.5,))(_teacache)


@register("adacache-teacache-forecast", "adacache-fx TeaCache rule forecast", full=(2.0, 2.5, 3.0), quick=(2.0,))
def _teacache_forecast(bench, key, method, v):
    """TeaCache's rule, cached steps adding half the linear forecast's change (as ``adacache-plus-forecast``)."""
    return _teacache(bench, key, method, v, gain=PLUS_FORECAST_GAIN)


register("adacache-teacache-compiled", "adacache-fx TeaCache rule compiled", full=(2.5, 4.0, 5.0, 7.0), quick=(2.0,))(
    lambda bench, key, method, v: _teacache(bench, key, method, v, compiled=True))


@register("adacache-compiled", "adacache-fx compiled", full=("none", "fast", "fast_100", "fast_100 x3"),
          quick=("none", "fast"))
def _compiled(bench, key, method, v):
    """With the uncached model compiled alike, for reference; ``fast_100``: the 100-step codebook (rates
    up to 12), ``x3``: its thresholds tripled (rate 12 on most steps), the fastest AdaCache points."""
    if v == "none":
        return _adacache(bench, key, f"{BASELINE} compiled", "inductor", None, compiled=True)
    scale = 3.0 if v.endswith("x3") else 1.0
    codebook = presets.FAST_30 if v == "fast" else {t * scale: r for t, r in presets.FAST_100.items()}
    label = "fast thresholds x1" if v == "fast" else f"fast_100 codebook (rates up to 12), thresholds x{scale:g}"
    config = AdaCacheConfig(num_steps=bench.steps, codebook=codebook)
    return _adacache(bench, key, method, f"{label}, inductor fullgraph", config, compiled=True)


@register("adacache-fbcache", "adacache-fx FirstBlockCache", full=(0.05, 0.1, 0.2, 0.3), quick=(0.1,))
def _first_block_cache(bench, key, method, v):
    """diffusers FirstBlockCache's rule (the ``fbcache`` peer's grid), decided inside the graph."""
    return _adacache(bench, key, method, f"threshold {v:g}",
                     FirstBlockCacheConfig(num_steps=bench.steps, threshold=v))


@register("adacache-fbcache-compiled", "adacache-fx FirstBlockCache rule compiled", full=(0.1, 0.2, 0.4, 0.8),
          quick=(0.1,))
def _first_block_cache_compiled(bench, key, method, v):
    return _adacache(bench, key, method, f"FirstBlockCache threshold {v:g}, inductor fullgraph",
                     FirstBlockCacheConfig(num_steps=bench.steps, threshold=v), compiled=True)


@register("adacache-easycache", "adacache-fx EasyCache rule", full=(0.025, 0.05, 0.1, 0.2), quick=(0.05,))
def _easycache(bench, key, method, v, compiled=False):
    """EasyCache's rule (no calibration: the transformation rate measured at run time), the official
    retention (a fifth of the steps computes first); compiled thresholds above 0.5, where that retention
    caps the speedup, a tenth."""
    retention = 0.1 if compiled and v > 0.5 else 0.2
    label = f"threshold {v:g}" + (f", retention {retention:g}" if retention != 0.2 else "")
    return _adacache(bench, key, method, label + (", inductor fullgraph" if compiled else ""),
                     EasyCacheConfig(num_steps=bench.steps, threshold=v, retention_ratio=retention), compiled=compiled)


register("adacache-easycache-compiled", "adacache-fx EasyCache rule compiled", full=(0.05, 0.2, 0.5, 1.0, 2.0),
         quick=(0.05,))(lambda bench, key, method, v: _easycache(bench, key, method, v, compiled=True))


#: ``adacache-plus``: the first fifth of the steps computes, at most 3 cached steps in a row.
PLUS_RULE = dict(max_skip_steps=3, retention_ratio=0.2, final_steps=0)


def _plus(bench, key, method, v, order=0, gain=1.0, compiled=False):
    """AdaCache+ (this video's measured change accumulated), threshold fitted on the held-out captions;
    ``order`` / ``gain``: the forecast a cached step adds (``extrapolation_order``, ``forecast_gain``).
    Targets above 2.5x (out of reach with K 3 and the retention) allow runs of 4, and where that is not
    enough (3x at N = 50) a retention of a tenth of the steps, then runs of 6 (4x), of 10 (5x), of 16 (7x)."""
    n = bench.steps
    rules = [{**PLUS_RULE, "max_skip_steps": 4}, {**PLUS_RULE, "max_skip_steps": 4, "retention_ratio": 0.1},
             {**PLUS_RULE, "max_skip_steps": 6, "retention_ratio": 0.1},
             {**PLUS_RULE, "max_skip_steps": 10, "retention_ratio": 0.1},
             {**PLUS_RULE, "max_skip_steps": 16, "retention_ratio": 0.1}]
    for fields in rules if v > 2.5 else [PLUS_RULE]:  # the first rule that can reach the target
        rule = AdaCachePlusConfig(num_steps=n, extrapolation_order=order, forecast_gain=gain, **fields)
        try:
            fit_plus_threshold([[0.0] * (n - 1)], rule, v)
            break
        except ValueError:
            continue
    else:
        return None
    label = (f"target {v:g}x steps, retention {rule.retention_ratio:g}, K {rule.max_skip_steps}"
             + (f", order {order}" if order else ""))
    label += "" if gain == 1.0 else f", gain {gain:g}" if gain != "fit" else ", fitted gain"
    label += ", inductor fullgraph" if compiled else ""

    def config():
        return replace(rule, threshold=fit_plus_threshold(bench.trajectories(), rule, v))

    return _adacache(bench, key, method, label, config, compiled=compiled)


register("adacache-plus", "adacache-fx AdaCache+", full=(2.0, 2.2, 2.5), quick=(1.5,))(_plus)


@register("adacache-plus-linear", "adacache-fx AdaCache+ linear", full=(2.2, 2.5), quick=(1.5,))
def _plus_linear(bench, key, method, v):
    """As ``adacache-plus``, cached steps adding the whole linear forecast."""
    return _plus(bench, key, method, v, order=1)


@register("adacache-plus-forecast", "adacache-fx AdaCache+ forecast", full=(1.5, 2.2, 2.5, 3.0, 3.2), quick=(1.5,))
def _plus_forecast(bench, key, method, v):
    """As ``adacache-plus``, cached steps adding half the linear forecast's change."""
    return _plus(bench, key, method, v, order=1, gain=PLUS_FORECAST_GAIN)


@register("adacache-plus-fit", "adacache-fx AdaCache+ fitted forecast", full=(2.5,), quick=(1.5,))
def _plus_fit(bench, key, method, v):
    """As ``adacache-plus``, the forecast's gain fitted to each video on its compute steps."""
    return _plus(bench, key, method, v, order=1, gain="fit")


@register("adacache-plus-compiled", "adacache-fx AdaCache+ forecast compiled",
          full=(1.5, 2.5, 3.0, 3.5, 4.0, 5.0, 7.0),
          quick=(1.5,))
def _plus_compiled(bench, key, method, v):
    return _plus(bench, key, method, v, order=1, gain=PLUS_FORECAST_GAIN, compiled=True)
