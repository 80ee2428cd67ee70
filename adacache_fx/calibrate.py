"""Fit an AdaCache codebook to a model: ``adacache_fx.calibrate(pipe, captions, num_steps, target)``.

The official codebooks were tuned on Open-Sora; another model's metric c lives on another scale, so its
thresholds would make it cache too much or never. Calibration runs a few uncached generations (every
step computes, ``presets.NEVER``), records the metric per step, and places the thresholds at quantiles of
what it saw:

* ``target="fast"`` / ``"slow"``: the official rate bases ``(6, 5, 4, 3, 2, 1)`` / ``(3, 2, 1, 1, 1, 1)``
  with thresholds at the 1/6 ... 5/6 quantiles of the observed metric, the last threshold a catch-all
  (``inf``: c at or above the fifth threshold gets the last rate).
* ``target=<float>``: a speedup in computed transformer steps (``N / computed``); the fast codebook's
  thresholds are scaled by the factor whose *predicted* number of computed steps is closest to
  ``N / target`` (the smallest such factor, i.e. the most conservative one).

Prediction (:func:`predict_computed`) runs the policy's own tensor code on the recorded trajectories
(:func:`adacache_fx.policies.replay.replay`: no rule is written twice). Under caching, the metric at a
compute step ``s`` compares the residual with the one of the previous compute step ``s - r``; only the
step-to-step distances ``d_j`` of the uncached run are known, so the replay approximates
``||p_s - p_{s-r}|| / ||p_{s-r}|| ~ d_{s-r+1} + ... + d_s`` (the triangle inequality as an equality: exact
when the residual drifts in one direction, an over-estimate when it oscillates, in which case the real
run computes fewer steps than predicted). The targets count computed steps; wall-clock speedups are a bit
lower (the patch embedding, output head, scheduler and guidance run at every step).

``warmup_steps`` and ``max_rate`` fit a codebook for a config with a warm-up (``AdaCacheConfig.warmup_steps``)
and a basis whose rates are capped (at most ``max_rate - 1`` cached steps in a row): on the reference model
both move the curve up, the early steps and long reuse runs being where the error comes from.

The quantiles pool the metric of steps 2..N-2 over all captions and CFG contexts (steps N-1 and N always
compute). The codebooks are fitted without motion regularization: MoReg multiplies c by its motion factor.

:func:`calibrate_plus` fits the threshold of AdaCache+ (:class:`~adacache_fx.AdaCachePlusConfig`) for a
target speedup the same way: :func:`predict_computed_plus` replays its rule on the recorded trajectories
and :func:`fit_plus_threshold` takes the smallest threshold of a geometric grid whose predicted computed
steps are closest to ``N / target``.

:func:`calibrate_magnitudes` measures the per-step magnitude ratios of MagCache
(``MagCacheConfig(mag_ratios=...)``) instead: no codebook, no target. :func:`calibrate_teacache` fits
TeaCache's rescaling polynomial (``TeaCacheConfig(coefficients=...)``) and :func:`fit_teacache_threshold`
its threshold for a target speedup, replaying the rule on the recorded signals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from . import presets
from .api import report
from .policies import AdaCacheConfig, AdaCachePlusConfig, TeaCacheConfig
from .policies.adacache import validate_codebook
from .policies.replay import mean_computed
from .state import check_num_steps

#: Rate bases of the official fast and slow codebooks (30 steps).
RATE_BASES: dict[str, tuple[int, ...]] = {
    "fast": tuple(presets.FAST_30.values()),
    "slow": tuple(presets.SLOW_30.values()),
}
#: Scale factors searched for a numeric target (geometric grid).
_SCALES = np.geomspace(1e-3, 1e3, 601)


def calibrate(
    pipe_or_model,
    captions: Sequence[str],
    num_steps: int,
    target="fast",
    seed: int = 0,
    warmup_steps: int = 0,
    max_rate: int | None = None,
) -> dict[float, int]:
    """Return a ``{threshold: rate}`` codebook fitted to the model of ``pipe_or_model``.

    ``pipe_or_model``: a diffusers pipeline with a ``transformer`` (e.g. ``ReferencePipeline``); its
    transformer is transformed for the runs and restored afterwards. ``captions``: prompts to generate
    (one generation each, generator seeded ``seed + i``). ``target``: ``"fast"``, ``"slow"`` or a speedup
    in computed steps ``1 <= target <= `` :func:`max_speedup` ``(num_steps, warmup_steps)``.
    ``warmup_steps``: the ``AdaCacheConfig.warmup_steps`` the codebook will run with (a numeric target
    counts them). ``max_rate``: cap the rates of the basis (at most ``max_rate - 1`` cached steps in a row).

    >>> import adacache_fx
    >>> from adacache_fx.tools.reference.pipeline import ReferencePipeline  # the bundled model
    >>> pipe = ReferencePipeline.from_reference()
    >>> codebook = adacache_fx.calibrate(pipe, ["a large red circle moving right fast"], num_steps=10, target=2.0)
    >>> sorted(set(codebook.values()))  # a fast basis, thresholds fitted to this model's metric
    [1, 2, 3, 4, 5, 6]
    """
    _check_target(target, num_steps, warmup_steps, max_rate)
    trajectories = record_metrics(pipe_or_model, captions, num_steps, seed=seed)
    return fit_codebook(trajectories, num_steps, target, warmup_steps, max_rate)


def calibrate_magnitudes(pipe, captions: Sequence[str], num_steps: int, seed: int = 0) -> list[float]:
    """MagCache's per-step magnitude ratios of the model of ``pipe``, for ``MagCacheConfig(mag_ratios=...)``.

    Runs uncached generations (one per caption, generator seeded ``seed + i``) with the block stack as one
    cached region, and reads the stack's residual ``r_s`` (output of the last block minus input of the
    first, of the region's first stream) after every step. Per generation and cache context: ``1.0`` at
    step 1, then ``mean(||r_s|| / (||r_{s-1}|| + 1e-8))`` with the norms over the last dimension (one per
    token), in float32: diffusers' ``MagCacheConfig(calibrate=True)`` formula. Returns the mean over
    captions and contexts (CFG's cond and uncond share one list, as they do in diffusers' bench use).

    >>> import adacache_fx
    >>> from adacache_fx.tools.reference.pipeline import ReferencePipeline
    >>> ratios = adacache_fx.calibrate_magnitudes(ReferencePipeline.from_reference(), ["a large red circle"], 6)
    >>> len(ratios), ratios[0]
    (6, 1.0)
    """
    def norms(model, output):
        regions = model.program().rewrite.regions
        if len(regions) != 1:
            raise ValueError(f"calibrate_magnitudes needs the block stack as one region; it is split into {regions}")
        return torch.linalg.norm(model.state()["cache_0_0"].float(), dim=-1)

    def ratios(cached, per_context):
        return [[1.0] + [float((now / (before + 1e-8)).mean()) for before, now in zip(seq, seq[1:])]
                for seq in per_context.values()]

    runs = _uncached_runs(pipe, lambda: AdaCacheConfig(num_steps=num_steps, codebook=presets.NEVER, granularity="stack"),
                          captions, num_steps, seed, norms, ratios)
    return np.mean(runs, axis=0).tolist()


def calibrate_teacache(pipe, captions: Sequence[str], num_steps: int, degree: int = 4, seed: int = 0
                       ) -> tuple[float, ...]:
    """TeaCache's rescaling polynomial for the model of ``pipe``, for ``TeaCacheConfig(coefficients=...)``.

    Runs uncached generations (:func:`record_teacache`) and fits, over every step ``s >= 2`` of every cache
    context, ``y ~ poly(x)`` by least squares (``numpy.polyfit``, ``degree``, highest degree first), with
    ``x`` the relative L1 change of the first block's modulated input (the signal the rule reads) and ``y``
    that of the transformer's output, between steps ``s - 1`` and ``s``: TeaCache's calibration.

    >>> import adacache_fx
    >>> from adacache_fx.tools.reference.pipeline import ReferencePipeline
    >>> coefficients = adacache_fx.calibrate_teacache(ReferencePipeline.from_reference(), ["a large red circle"], 8)
    >>> len(coefficients)
    5
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be an int >= 0, got {degree!r}")
    return fit_teacache_polynomial(record_teacache(pipe, captions, num_steps, seed), degree)


def fit_teacache_polynomial(runs, degree: int = 4) -> tuple[float, ...]:
    """``y ~ poly(x)`` by least squares over the finite step pairs of ``runs`` (see :func:`record_teacache`)."""
    pairs = [pair for signal, output in runs for pair in zip(signal[1:], output[1:], strict=True)]
    xs = np.asarray([x for x, _ in pairs], dtype=np.float64)
    ys = np.asarray([y for _, y in pairs], dtype=np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys)
    if keep.sum() <= degree:
        raise RuntimeError(f"{int(keep.sum())} finite step pairs recorded: too few to fit a degree-{degree} "
                           "polynomial (more captions or steps)")
    return tuple(float(c) for c in np.polyfit(xs[keep], ys[keep], degree))


def record_teacache(pipe, captions: Sequence[str], num_steps: int, seed: int = 0
                    ) -> list[tuple[list[float], list[float]]]:
    """Uncached generations (one per caption, generator seeded ``seed + i``): per caption and cache context,
    ``(signal, output)``, the relative L1 change from the step before of the first block's modulated input
    and of the transformer's output, at steps ``1..N`` (NaN at step 1)."""
    def output_of(model, output):
        while not isinstance(output, torch.Tensor):
            output = output[0] if isinstance(output, (tuple, list)) else output.sample
        return output.detach().float()

    def pairs(cached, per_context):
        runs = []
        for context, seq in per_context.items():
            signal = [math.nan if v is None else v for v in report(cached, context).column("rel")]
            if len(signal) != len(seq):
                raise RuntimeError(f"cache context {context!r} recorded {len(signal)} steps for {len(seq)} "
                                   "transformer calls: one call per step and context is expected")
            change = [math.nan] + [float((now - before).abs().sum() / before.abs().sum().clamp_min(1e-12))
                                   for before, now in zip(seq, seq[1:])]
            runs.append((signal, change))
        return runs

    # threshold 0: every step computes (acc >= 0), and the history records the signal's change
    return _uncached_runs(pipe, lambda: TeaCacheConfig(num_steps=num_steps, threshold=0.0), captions, num_steps,
                          seed, output_of, pairs)


def _uncached_runs(pipe, make_config, captions, num_steps: int, seed: int, value, collect) -> list:
    """Generate each caption (generator seeded ``seed + i``) with ``make_config()`` enabled on the pipeline's
    transformer (restored afterwards). After every transformer call ``value(model, output)`` is recorded per
    cache context; after each generation ``collect(model, {context: values})`` returns that caption's runs."""
    from .integrations.diffusers import disable, enable

    captions = _check_captions(captions)
    check_num_steps(num_steps)
    _check_pipe(pipe)
    cached = enable(pipe, make_config())
    per_context: dict[str, list] = {}

    def record(model, args, kwargs, output):
        per_context.setdefault(model.active_context, []).append(value(model, output))

    handle = cached.register_forward_hook(record, with_kwargs=True)
    runs = []
    try:
        for i, caption in enumerate(captions):
            per_context.clear()
            pipe(prompt=caption, num_inference_steps=num_steps, generator=torch.Generator().manual_seed(seed + i))
            runs += collect(cached, per_context)
    finally:
        handle.remove()
        disable(pipe)
    if not runs:
        raise RuntimeError("the pipeline never called its transformer: nothing to calibrate on")
    return runs


def fit_teacache_threshold(signals: Sequence[Sequence[float]], config, target: float) -> float:
    """The TeaCache threshold whose replayed computed steps (its rule on ``signals``, the per-step changes
    :func:`record_teacache` reads, NaN at step 1) come closest to ``N / target`` (the smallest such), for
    ``config`` (its ``num_steps``, ``coefficients``, ``warmup_steps``)."""
    n = config.num_steps
    if n is None:
        raise ValueError("fit_teacache_threshold needs config.num_steps")
    max_target = n / len(set(range(1, min(n, max(1, config.warmup_steps)) + 1)) | {n})  # only the forced steps
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 1.0 <= target <= max_target:
        raise ValueError(f"target speedup must be a number in [1, {max_target:.2f}] for {n} steps, got {target!r}")
    changes = [list(signal)[1:] for signal in signals]  # step s's change at index s - 2
    return _closest_threshold(lambda t: mean_computed(replace(config, threshold=t), changes, n), n / float(target))


def _closest_threshold(predicted_computed, wanted: float) -> float:
    """The smallest threshold of the geometric grid whose predicted computed steps come closest to ``wanted``."""
    return float(min(_SCALES * 1e-2, key=lambda t: abs(predicted_computed(float(t)) - wanted)))


def calibrate_plus(pipe, captions: Sequence[str], num_steps: int, target: float, seed: int = 0, **rule):
    """An :class:`~adacache_fx.AdaCachePlusConfig` (``num_steps`` and the other fields of ``rule``) whose
    threshold is fitted for ``target``, a speedup in computed steps, on uncached generations of ``captions``.

    >>> import adacache_fx
    >>> from adacache_fx.tools.reference.pipeline import ReferencePipeline
    >>> pipe = ReferencePipeline.from_reference()
    >>> config = adacache_fx.calibrate_plus(pipe, ["a large red circle moving right fast"], 10, target=1.5)
    >>> config.threshold > 0
    True
    """
    config = AdaCachePlusConfig(num_steps=num_steps, **rule)
    trajectories = record_metrics(pipe, captions, num_steps, seed=seed, metric_block=config.metric_block,
                                  metric_branch=config.metric_branch)
    return AdaCachePlusConfig(**{**rule, "num_steps": num_steps,
                                 "threshold": fit_plus_threshold(trajectories, config, target)})


def predict_computed_plus(trajectories: Sequence[Sequence[float]], config, num_steps: int | None = None) -> float:
    """Mean number of computed steps of the AdaCache+ rule of ``config`` replayed on ``trajectories``
    (see :func:`record_metrics`) with N = ``num_steps`` (default ``config.num_steps``)."""
    return mean_computed(config, trajectories, num_steps or config.num_steps)


def fit_plus_threshold(trajectories: Sequence[Sequence[float]], config, target: float) -> float:
    """The AdaCache+ threshold whose replayed computed steps come closest to ``N / target`` (the
    smallest such, i.e. the most conservative) for ``config`` (its ``num_steps`` and rule fields)."""
    n = config.num_steps
    if n is None:
        raise ValueError("fit_plus_threshold needs config.num_steps")
    most = mean_computed(replace(config, threshold=1.0), [[0.0] * (n - 1)], n)  # nothing changes: the fewest
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 1.0 <= target <= n / most:
        raise ValueError(f"target speedup must be a number in [1, {n / most:.2f}] for {n} steps with "
                         f"this retention, final steps and K, got {target!r}")
    return _closest_threshold(lambda t: predict_computed_plus(trajectories, replace(config, threshold=t), n),
                              n / float(target))


def _check_pipe(pipe) -> None:
    if getattr(pipe, "transformer", None) is None or not callable(pipe):
        raise TypeError(
            f"calibrate needs a diffusers pipeline with a `transformer` (e.g. ReferencePipeline), "
            f"got {type(pipe).__name__}"
        )


def record_metrics(pipe, captions: Sequence[str], num_steps: int, seed: int = 0, metric_block=None,
                   metric_branch: int = 0) -> list[list[float]]:
    """Run uncached generations and return the per-step metric trajectories.

    One trajectory per caption and cache context: ``d[s]`` for steps ``s = 2..N`` (index ``s - 2``), the
    relative L1 distance between the metric residuals of steps ``s - 1`` and ``s``, read where
    ``metric_block`` / ``metric_branch`` say (as in :class:`~adacache_fx.CacheConfig`).
    """
    from .integrations.diffusers import disable, enable

    captions = _check_captions(captions)
    check_num_steps(num_steps)
    _check_pipe(pipe)
    cached = enable(pipe, AdaCacheConfig(num_steps=num_steps, codebook=presets.NEVER, metric_block=metric_block,
                                         metric_branch=metric_branch))
    trajectories = []
    try:
        for i, caption in enumerate(captions):
            generator = torch.Generator().manual_seed(seed + i)
            pipe(prompt=caption, num_inference_steps=num_steps, generator=generator)
            for context in cached.generation_contexts:  # e.g. "cond" and "uncond" of CFG, or "default"
                steps = report(cached, context).steps
                trajectories.append([math.nan if r["metric"] is None else r["metric"] for r in steps[1:]])
    finally:
        disable(pipe)
    if not trajectories:
        raise RuntimeError("the pipeline never called its transformer: nothing to calibrate on")
    return trajectories


def fit_codebook(
    trajectories: Sequence[Sequence[float]],
    num_steps: int,
    target="fast",
    warmup_steps: int = 0,
    max_rate: int | None = None,
) -> dict[float, int]:
    """Codebook from recorded trajectories (see :func:`record_metrics`) for ``target`` (see :func:`calibrate`)."""
    _check_target(target, num_steps, warmup_steps, max_rate)
    values = np.asarray([v for t in trajectories for v in t[: max(0, num_steps - 3)]], dtype=np.float64)
    values = values[np.isfinite(values)]  # steps N-1 and N always compute: their metric decides nothing
    if values.size == 0:
        raise ValueError("no finite metric values recorded: cannot calibrate")
    quantiles = np.quantile(values, np.arange(1, 6) / 6)
    thresholds = []
    for q in quantiles:
        low = thresholds[-1] * (1 + 1e-6) if thresholds else 1e-12
        thresholds.append(max(float(q), low))  # strictly increasing and positive
    if isinstance(target, str):
        return validate_codebook(dict(zip([*thresholds, math.inf], _capped(RATE_BASES[target], max_rate))))
    rates = _capped(RATE_BASES["fast"], max_rate)
    wanted = num_steps / float(target)
    best = min(
        _SCALES,
        key=lambda k: abs(
            predict_computed(trajectories, _scaled(thresholds, rates, k), num_steps, warmup_steps) - wanted
        ),
    )  # min returns the first (smallest) of equally good scales
    return _scaled(thresholds, rates, float(best))


def predict_computed(
    trajectories: Sequence[Sequence[float]], codebook, num_steps: int, warmup_steps: int = 0
) -> float:
    """Mean number of computed steps when ``codebook`` decides on the recorded trajectories (see module doc)."""
    config = AdaCacheConfig(num_steps=num_steps, codebook=validate_codebook(codebook), warmup_steps=warmup_steps)
    return mean_computed(config, trajectories, num_steps)


def max_speedup(num_steps: int, warmup_steps: int = 0, max_rate: int | None = None) -> float:
    """Largest speedup in computed steps the fast basis can reach: its top rate (6) after the warm-up."""
    check_num_steps(num_steps)
    start, top = max(2, warmup_steps), max(_capped(RATE_BASES["fast"], max_rate))
    computed = len({1, num_steps - 1, num_steps} | set(range(1, start)) | set(range(start, num_steps + 1, top)))
    return num_steps / computed


def _capped(rates: tuple[int, ...], max_rate: int | None) -> tuple[int, ...]:
    return rates if max_rate is None else tuple(min(r, max_rate) for r in rates)


def _scaled(thresholds, rates, factor: float) -> dict[float, int]:
    return validate_codebook(dict(zip([t * factor for t in thresholds] + [math.inf], rates)))


def _check_captions(captions) -> list[str]:
    if isinstance(captions, str):
        captions = [captions]
    captions = list(captions)
    if not captions or not all(isinstance(c, str) and c for c in captions):
        raise ValueError("calibrate needs at least one non-empty caption")
    return captions


def _check_target(target, num_steps: int, warmup_steps: int = 0, max_rate: int | None = None) -> None:
    if max_rate is not None and (isinstance(max_rate, bool) or not isinstance(max_rate, int) or max_rate < 1):
        raise ValueError(f"max_rate must be an int >= 1 or None, got {max_rate!r}")
    if isinstance(target, str):
        if target not in RATE_BASES:
            raise ValueError(f"target must be 'fast', 'slow' or a speedup, got {target!r}")
        return
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < num_steps:
        raise ValueError(f"warmup_steps must be an int in [0, {num_steps}), got {warmup_steps!r}")
    top = max_speedup(num_steps, warmup_steps, max_rate)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 1.0 <= target <= top:
        raise ValueError(
            f"target speedup must be a number in [1, {top:.2f}] for {num_steps} steps"
            + (f" with {warmup_steps} warm-up steps" if warmup_steps else "")
            + f", got {target!r}"
        )
