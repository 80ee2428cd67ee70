"""AdaCache+ in the graph: a plain-Python reference of its rule (module doc of
``adacache_fx.policies.adacache_plus``), the in-graph schedule equal to it on the tiny fixture models
(every granularity, eager), cache contexts, compiled fullgraph with 0 breaks, ONNX, bf16, calibration."""

import math

import numpy as np
import pytest
import torch
from helpers import assert_compiled_and_exported, hand_reference, max_diff, run_steps

import adacache_fx as ax
from adacache_fx.calibrate import fit_plus_threshold, predict_computed_plus
from adacache_fx.policies.replay import schedule
from adacache_fx.tools.fixtures import build, tiny_dit

f32 = np.float32


def reference_schedule(change, num_steps, threshold, max_skip, retention_ratio=0.2, final_steps=1, warmup_steps=0):
    """The rule, plain Python: ``change(s, last)`` is the measured per-step change at compute step ``s``
    whose previous compute step is ``last``; accumulation in float32 as in the graph."""
    retention = max(1, int(retention_ratio * num_steps + 0.5), warmup_steps)
    c, acc, run, last, computed = math.inf, f32(0), 0, None, []
    for s in range(1, num_steps + 1):
        if s > retention and s <= num_steps - final_steps:
            predicted = f32(acc + f32(c))
            if predicted <= f32(threshold) and run < max_skip:
                acc, run = predicted, run + 1
                continue
        if last is not None:
            c = change(s, last)
        acc, run, last = f32(0), 0, s
        computed.append(s)
    return computed


def residuals(model, make_inputs, num_steps, **config):
    """The metric residual ``p_s`` of every step (all computed: threshold 0)."""
    cached = ax.transform(model, ax.AdaCachePlusConfig(num_steps=num_steps, threshold=0.0, **config))
    kept = []
    with torch.no_grad():
        for s in range(num_steps):
            cached(**make_inputs(s))
            kept.append(cached.state()["p_prev_0"].clone())
    assert ax.report(cached).computed_steps == list(range(1, num_steps + 1))
    return kept


def measured_change(kept):
    def change(s, last):
        p, q = kept[s - 1].float(), kept[last - 1].float()
        return float((p - q).abs().sum() / q.abs().sum().clamp_min(1e-12) / (s - last))

    return change


def policy_schedule(config, num_steps, change, generations=1):
    """The policy's decisions, its tensor code called directly with metric parts from ``change``."""
    policy = ax.policies.AdaCachePlusPolicy(config)
    state = {spec.name: torch.full(spec.shape, spec.fill, dtype=spec.dtype) for spec in policy.state_specs()}
    step, n = torch.tensor(0), torch.tensor(num_steps)
    computed, last = [], 1
    for _ in range(num_steps * generations):
        s, compute, state = policy.decide(step, n, state)
        parts = torch.zeros(2)
        if bool(compute) and int(s) > 1:
            parts = torch.tensor([change(int(s), last) * (int(s) - last), 1.0])
        state, _ = policy.update(s, compute, [parts], state, n)
        step = s
        if bool(compute):
            computed.append(int(s))
            last = int(s)
    return computed


# -- the rule ---------------------------------------------------------------------------------------
def test_policy_and_replay_equal_the_reference_over_parameters():
    rng = np.random.default_rng(0)
    profiles = [lambda s, last: 0.3 / s + 0.05,  # large early, then flat (as the reference model)
                lambda s, last: float(0.02 + 0.2 * rng.random())]
    checked = 0
    for profile in profiles:
        table = {}

        def change(s, last, profile=profile, table=table):  # one fixed value per (s, last)
            return table.setdefault((s, last), float(f32(profile(s, last))))

        for n in (8, 30):
            for threshold in (0.0, 0.05, 0.1, 0.2, 0.4, 10.0):
                for k in (0, 1, 2, 3):
                    for retention, final, warmup in ((0.2, 1, 0), (0.0, 0, 0), (0.1, 2, 0), (0.0, 0, 5)):
                        config = ax.AdaCachePlusConfig(threshold=threshold, max_skip_steps=k, retention_ratio=retention,
                                                       final_steps=final, warmup_steps=warmup)
                        expected = reference_schedule(change, n, threshold, k, retention, final, warmup)
                        gens = 2 if n == 8 else 1
                        assert policy_schedule(config, n, change, gens) == expected * gens, (n, threshold, k)
                        checked += 1
    assert checked == 2 * 2 * 6 * 4 * 4
    # calibration's replay: the policy's tensor code on recorded step changes d_s, the change since the
    # last compute step taken as their sum (float64, as the replay sums them)
    d = [float(0.02 + 0.2 * rng.random()) for _ in range(29)]  # steps 2..30
    for threshold in (0.05, 0.2, 0.4):
        for k in (1, 3):
            config = ax.AdaCachePlusConfig(threshold=threshold, max_skip_steps=k, final_steps=0)
            recorded = lambda s, last: sum(d[last - 1: s - 1]) / (s - last)  # noqa: E731
            assert schedule(config, d, 30) == reference_schedule(recorded, 30, threshold, k, final_steps=0)
    flat = lambda s, last: 0.05  # noqa: E731
    assert reference_schedule(flat, 30, 0.1, 3) == [1, 2, 3, 4, 5, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert reference_schedule(flat, 30, 10.0, 3, final_steps=0) == [1, 2, 3, 4, 5, 6, 10, 14, 18, 22, 26, 30]
    assert reference_schedule(flat, 30, 0.04, 3) == list(range(1, 31))


def test_config_validates_and_round_trips():
    import json

    from adacache_fx.config import config_from_dict

    config = ax.AdaCachePlusConfig(num_steps=12, threshold=0.1, max_skip_steps=2, retention_ratio=0.25,
                                   final_steps=0, granularity="block", extrapolation_order=2)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in (dict(threshold=-1.0), dict(threshold=math.inf), dict(max_skip_steps=-1), dict(final_steps=True),
                dict(retention_ratio=1.5)):
        with pytest.raises(ValueError):
            ax.AdaCachePlusConfig(**bad)


# -- in the graph -----------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["stack", "block", "branch"])
def test_model_schedule_and_outputs_equal_the_references(granularity):
    model, make_inputs = build("wan")
    change = measured_change(residuals(model, make_inputs, 12, granularity=granularity))
    seen = set()
    for threshold in (0.0, 0.2, 0.45, 1.2):  # the fixture's c is 0.11-0.32
        config = ax.AdaCachePlusConfig(num_steps=12, threshold=threshold, max_skip_steps=3, granularity=granularity)
        cached = ax.transform(model, config)
        got = run_steps(cached, make_inputs, 12)
        expected = reference_schedule(change, 12, threshold, 3)
        report = ax.report(cached)
        assert report.computed_steps == expected, threshold
        seen.add(len(expected))
        assert max_diff(got, hand_reference(model, make_inputs, 12, expected, granularity)) < 1e-5
    assert len(seen) >= 3  # the thresholds give different schedules: the check is not vacuous


def test_cache_contexts_keep_their_own_state_and_reset_restarts():
    model, make_inputs = tiny_dit()
    change = measured_change(residuals(model, make_inputs, 12))
    config = ax.AdaCachePlusConfig(num_steps=12, threshold=0.15, max_skip_steps=2)
    expected = reference_schedule(change, 12, 0.15, 2)
    assert 4 < len(expected) < 12
    cached = ax.transform(model, config)
    with torch.no_grad():
        for s in range(12):
            with cached.cache_context("cond"):
                cached(**make_inputs(s))
            with cached.cache_context("uncond"):
                cached(**make_inputs(s))
    assert ax.report(cached, "cond").computed_steps == expected == ax.report(cached, "uncond").computed_steps
    run_steps(cached, make_inputs, 5)
    ax.reset(cached)
    first = run_steps(cached, make_inputs, 12)
    assert ax.report(cached).computed_steps == expected
    second = run_steps(cached, make_inputs, 12)  # a new generation starts after step N by itself
    assert ax.report(cached).computed_steps == expected
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_compiled_fullgraph_and_onnx_schedules_equal_eager(tmp_path):
    model, make_inputs = tiny_dit()
    config = ax.AdaCachePlusConfig(num_steps=12, threshold=0.15, max_skip_steps=2, granularity="block",
                                   extrapolation_order=1)
    cached = ax.transform(model, config)
    eager = run_steps(cached, make_inputs, 12)
    expected = ax.report(cached).computed_steps
    assert expected == reference_schedule(measured_change(residuals(model, make_inputs, 12)), 12, 0.15, 2)

    assert_compiled_and_exported(cached, make_inputs, 12, eager, expected, tmp_path / "plus.onnx")


def test_bf16_decides_in_float32():
    model, make_inputs = build("wan", dtype=torch.bfloat16)
    kept = residuals(model, make_inputs, 12)
    config = ax.AdaCachePlusConfig(num_steps=12, threshold=0.5, max_skip_steps=3)
    cached = ax.transform(model, config)
    outs = run_steps(cached, make_inputs, 12)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in outs)
    state = cached.state()
    assert state["history"].dtype == state["plus_c"].dtype == state["plus_acc"].dtype == torch.float32
    expected = reference_schedule(measured_change(kept), 12, 0.5, 3)
    assert ax.report(cached).computed_steps == expected and len(expected) < 12
    assert max_diff(outs, hand_reference(model, make_inputs, 12, expected, "stack")) <= 2**-6


# -- calibration ------------------------------------------------------------------------------------
def test_fit_threshold_reaches_the_target_on_recorded_trajectories():
    rng = np.random.default_rng(1)
    trajectories = [list(0.3 / np.arange(2, 31) + 0.05 + 0.01 * rng.random(29)) for _ in range(4)]
    config = ax.AdaCachePlusConfig(num_steps=30, max_skip_steps=3, retention_ratio=0.2, final_steps=0)
    last = None
    for target in (1.5, 2.0, 2.5):
        threshold = fit_plus_threshold(trajectories, config, target)
        fitted = ax.AdaCachePlusConfig(num_steps=30, max_skip_steps=3, retention_ratio=0.2, final_steps=0,
                                       threshold=threshold)
        computed = predict_computed_plus(trajectories, fitted)
        assert abs(computed - 30 / target) <= 1.0, (target, computed)
        assert last is None or threshold > last
        last = threshold
    with pytest.raises(ValueError, match="target speedup"):
        fit_plus_threshold(trajectories, config, 2.6)  # 6 retained + 24 / 4: at most 12 computed
