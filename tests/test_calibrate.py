"""adacache_fx.calibrate: codebooks fitted to a model (untrained tiny reference pipeline, few steps)."""

import math

import pytest
import torch

import adacache_fx as ax
from adacache_fx.calibrate import RATE_BASES, calibrate, fit_codebook, max_speedup, predict_computed, record_metrics
from adacache_fx.tools.fixtures import untrained_reference_pipeline

N = 8
CAPTIONS = ["a large red circle staying still", "a small blue square moving right fast"]


@pytest.fixture(scope="module")
def pipe():
    return untrained_reference_pipeline()


@pytest.fixture(scope="module")
def trajectories(pipe):
    return record_metrics(pipe, CAPTIONS, N)


def test_records_one_trajectory_per_caption_and_context_and_restores_the_pipeline(pipe, trajectories):
    assert len(trajectories) == 2 * len(CAPTIONS)  # cond and uncond
    assert all(len(t) == N - 1 and all(v > 0 for v in t) for t in trajectories)
    assert not isinstance(pipe.transformer, ax.CachedModel)


@pytest.mark.parametrize("target", ["fast", "slow"])
def test_presets_keep_the_official_rates_with_increasing_thresholds(trajectories, target):
    codebook = fit_codebook(trajectories, N, target)
    thresholds = list(codebook)
    assert tuple(codebook.values()) == RATE_BASES[target]
    assert all(a < b for a, b in zip(thresholds, thresholds[1:]))
    assert math.isinf(thresholds[-1])  # the catch-all
    values = sorted(v for t in trajectories for v in t[: N - 3])
    assert values[0] <= thresholds[0] <= thresholds[4] <= values[-1]  # quantiles of what was seen


def test_replay_is_exact_without_caching_and_for_a_never_reusing_codebook(trajectories):
    assert predict_computed(trajectories, {1e9: 1}, N) == N
    assert predict_computed(trajectories, {1e-9: 1, 1.0: 1}, N) == N
    # rate 6 everywhere: steps 1, 2, then N-1 and N
    assert predict_computed(trajectories, {1e9: 6}, N) == len({1, 2, N - 1, N}) == 4
    assert max_speedup(N) == N / 4
    # a warm-up of 4 steps (N = 8): steps 1-4, then rate 6 from step 4 reaches only N-1 and N
    assert predict_computed(trajectories, {1e9: 6}, N, warmup_steps=4) == len({1, 2, 3, 4, N - 1, N}) == 6
    assert max_speedup(N, warmup_steps=4) == N / 6
    capped = fit_codebook(trajectories, N, 1.5, warmup_steps=2, max_rate=3)
    assert tuple(capped.values()) == (3, 3, 3, 3, 2, 1)
    assert max_speedup(N, max_rate=3) == N / len({1, 2, 5, N - 1, N})
    with pytest.raises(ValueError, match="max_rate"):
        fit_codebook(trajectories, N, 1.5, max_rate=0)


def test_larger_target_computes_fewer_steps_in_a_real_run(pipe, trajectories):
    computed = {}
    for target in (1.2, 2.0):
        codebook = fit_codebook(trajectories, N, target)
        assert tuple(codebook.values()) == RATE_BASES["fast"]
        cached = ax.enable(pipe, ax.AdaCacheConfig(codebook=codebook))
        try:
            counts = []
            for i, caption in enumerate(CAPTIONS[:1]):
                pipe(caption, num_inference_steps=N, generator=torch.Generator().manual_seed(i))
                counts += [ax.report(cached, c).num_computed for c in ("cond", "uncond")]
        finally:
            ax.disable(pipe)
        computed[target] = sum(counts) / len(counts)
    assert computed[2.0] < computed[1.2] <= N
    # the prediction is close to the real count (it over-estimates distances, so it may predict more)
    assert abs(predict_computed(trajectories, fit_codebook(trajectories, N, 2.0), N) - computed[2.0]) <= 2


def test_deterministic(pipe, trajectories):
    assert calibrate(pipe, CAPTIONS, N, target=2.0) == fit_codebook(trajectories, N, 2.0)


def test_thresholds_are_the_sextiles_of_the_pooled_metric():
    # N = 10: the distances of steps 2..8 decide (7 values); steps N-1 and N always compute
    trajectories = [[0.3, 0.0, 0.6, 0.1, 0.5, 0.2, 0.4, 99.0, 99.0], [math.nan] * 9]  # NaN: no metric recorded
    # sorted 0.0 0.1 ... 0.6: the k/6 quantile is 0.1 k; rates of the official codebooks (30 steps)
    fast = fit_codebook(trajectories, 10, "fast")
    assert list(fast) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, math.inf])
    assert list(fast.values()) == [6, 5, 4, 3, 2, 1]
    assert list(fit_codebook(trajectories, 10, "slow").values()) == [3, 2, 1, 1, 1, 1]
    assert list(fit_codebook(trajectories, 10, "fast", max_rate=4).values()) == [4, 4, 4, 3, 2, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"captions": []}, "caption"),
        ({"captions": [""]}, "caption"),
        ({"num_steps": 2}, "num_steps"),
        ({"target": 0.5}, "target"),
        ({"target": 100.0}, "target"),
        ({"target": "medium"}, "target"),
    ],
)
def test_bad_input(pipe, kwargs, message):
    args = {"captions": CAPTIONS, "num_steps": N, "target": "fast"} | kwargs
    with pytest.raises(ValueError, match=message):
        calibrate(pipe, args["captions"], args["num_steps"], target=args["target"])


def test_needs_a_pipeline():
    with pytest.raises(TypeError, match="transformer"):
        calibrate(torch.nn.Linear(2, 2), CAPTIONS, N)
