"""EasyCache in the graph (one policy module, ``adacache_fx/policies/easycache.py``): a plain-Python
reference of its rule on the signals the run measured, the in-graph schedule equal to it, outputs equal
to a hand-cached run, cache contexts, compiled fullgraph with 0 breaks, ONNX, bf16."""

import math

import pytest
import torch
from helpers import assert_compiled_and_exported, hand_reference, max_diff, run_steps

import adacache_fx as ax
from adacache_fx.tools.fixtures import build

N = 16


def reference_schedule(inputs, outputs, num_steps, threshold, retention_ratio=0.2):
    """EasyCache's rule in plain Python (float64 means): ``inputs[s - 1]`` the input signal at step ``s``,
    ``outputs[s - 1]`` the output at step ``s`` (read on the steps the rule computes). The input's change
    between compute steps is its path length (the sum of the step changes), as the graph keeps it."""
    retention = max(1, int(retention_ratio * num_steps + 0.5))
    computed, k, err, last_out, moved = [], None, 0.0, None, 0.0

    def mean_abs(t):
        return float(t.double().abs().mean())

    for s in range(1, num_steps + 1):
        change = mean_abs(inputs[s - 1] - inputs[s - 2]) if s > 1 else 0.0
        moved += change
        if not (s <= retention or s == num_steps) and k is not None:
            err += k * change / mean_abs(last_out)
            if err < threshold:
                continue
        err = 0.0
        out = outputs[s - 1]
        if last_out is not None and moved > 0:
            k = mean_abs(out - last_out) / moved
        last_out, moved = out, 0.0
        computed.append(s)
    return computed


def run_recording(model, make_inputs, config):
    """The transformed run, with the signals its state kept after each step: the input (site 0, kept
    every step) and the metric residual (site 1, the last compute step's)."""
    cached = ax.transform(model, config)
    inputs, outputs, results = [], [], []
    with torch.no_grad():
        for s in range(config.num_steps):
            out = cached(**make_inputs(s))
            results.append((out[0] if isinstance(out, tuple) else out).clone())
            inputs.append(cached.state()["p_prev_0"].clone())
            outputs.append(cached.state()["p_prev_1"].clone())
    return cached, inputs, outputs, results


@pytest.mark.parametrize("family,threshold", [("wan", 0.3), ("cogvideox", 0.5), ("stdit", 0.6)])
def test_schedule_equals_the_reference_and_outputs_a_hand_cached_run(family, threshold):
    model, make_inputs = build(family)
    config = ax.EasyCacheConfig(num_steps=N, threshold=threshold)
    cached, inputs, outputs, results = run_recording(model, make_inputs, config)
    report = ax.report(cached)
    expected = reference_schedule(inputs, outputs, N, threshold)
    assert report.computed_steps == expected
    assert 4 < len(expected) < N  # retention (3 steps), the last one, and some cached in between
    assert report.computed_steps[:3] == [1, 2, 3] and report.computed_steps[-1] == N
    assert max_diff(results, hand_reference(model, make_inputs, N, set(expected), "stack")) < 1e-5
    pred = report.column("pred")
    assert all(v is None for v in pred[:3]) and all(v is not None and v > 0 for v in pred[4:-1])


def test_a_threshold_of_zero_computes_every_step_and_a_large_one_skips_after_the_retention():
    model, make_inputs = build("wan", num_layers=2)
    exact = ax.transform(model, ax.EasyCacheConfig(num_steps=N, threshold=0.0))
    assert max_diff(run_steps(exact, make_inputs, N), run_steps(model, make_inputs, N)) == 0.0
    assert ax.report(exact).num_computed == N
    greedy = ax.transform(model, ax.EasyCacheConfig(num_steps=N, threshold=1e9, retention_ratio=0.25))
    run_steps(greedy, make_inputs, N)
    # 4 retained steps; the rate is known from step 2 on, so every later step but the last is cached
    assert ax.report(greedy).computed_steps == [1, 2, 3, 4, N]


def test_cache_contexts_decide_apart():
    model, make_inputs = build("wan", num_layers=2)
    cached = ax.transform(model, ax.EasyCacheConfig(num_steps=N, threshold=0.3))

    def uncond(step):
        inputs = make_inputs(step)
        return {**inputs, "encoder_hidden_states": torch.zeros_like(inputs["encoder_hidden_states"])}

    with torch.no_grad():
        for s in range(N):
            with cached.cache_context("cond"):
                cached(**make_inputs(s))
            with cached.cache_context("uncond"):
                cached(**uncond(s))
    alone = ax.transform(model, ax.EasyCacheConfig(num_steps=N, threshold=0.3))
    run_steps(alone, make_inputs, N)
    assert ax.report(cached, "cond").computed_steps == ax.report(alone).computed_steps
    assert ax.report(cached, "uncond").num_computed < N


def test_compiled_fullgraph_and_onnx(tmp_path):
    model, make_inputs = build("wan", num_layers=2)
    cached = ax.transform(model, ax.EasyCacheConfig(num_steps=N, threshold=0.3))
    eager = run_steps(cached, make_inputs, N)
    expected = ax.report(cached).computed_steps
    assert 4 < len(expected) < N
    assert_compiled_and_exported(cached, make_inputs, N, eager, expected, tmp_path / "easycache.onnx")


def test_bf16_decides_in_float32():
    model, make_inputs = build("wan", num_layers=2, dtype=torch.bfloat16)
    cached = ax.transform(model, ax.EasyCacheConfig(num_steps=N, threshold=0.3))
    outs = run_steps(cached, make_inputs, N)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    assert cached.state()["easy_rate"].dtype == torch.float32
    assert 4 < ax.report(cached).num_computed < N


def test_config_round_trips_and_validates():
    from adacache_fx.config import config_from_dict

    config = ax.EasyCacheConfig(num_steps=30, threshold=0.025, retention_ratio=0.1, extrapolation_order=1)
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="threshold"):
        ax.EasyCacheConfig(threshold=math.nan)
    with pytest.raises(ValueError, match="retention_ratio"):
        ax.EasyCacheConfig(retention_ratio=1.5)


def test_report_flags_no_step_for_the_nan_it_records_by_design():
    """EasyCache records pred = NaN where k is unknown (its forced steps): not a non-finite metric."""
    model, make_inputs = build("wan")
    cached = ax.transform(model, ax.EasyCacheConfig(num_steps=8))
    run_steps(cached, make_inputs, 8)
    report = ax.report(cached)
    assert report.steps[1]["pred"] is None and not any(r.nonfinite for r in report.steps)
    assert "non-finite" not in str(report)
