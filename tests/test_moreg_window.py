"""MoReg's step window scales with N by default (official anchors), in the graph: eager, compiled, ONNX."""

import pytest
import torch
import torch._dynamo.testing
from reference_adacache import schedule
from test_policy import Probe, synthetic_trajectory

import adacache_fx as ax
from adacache_fx import presets

CODEBOOK = {0.3: 4, 0.6: 2, 10.0: 1}


def test_default_window_gives_the_official_windows_and_keeps_an_explicit_one():
    assert ax.MoRegConfig().window_for(30) == presets.MOREG_WINDOW_30 == (4, 26)
    assert ax.MoRegConfig().window_for(100) == presets.MOREG_WINDOW_100 == (10, 90)
    assert ax.MoRegConfig().window_for(12) == (3, 9)
    assert ax.MoRegConfig(window=(2, 5)).window_for(100) == (2, 5)
    for moreg in (ax.MoRegConfig(), ax.MoRegConfig(window=(2, 5))):
        config = ax.AdaCacheConfig(moreg=moreg)
        assert ax.AdaCacheConfig.from_dict(config.to_dict()) == config


def _run(cached, trajectory):
    x = torch.zeros(1, 24, 5)
    with torch.no_grad():
        for r in trajectory:
            cached(x, r)
    return ax.report(cached)


def _expected(trajectory, moreg):
    return schedule(trajectory, len(trajectory), CODEBOOK, moreg=moreg, batch=1, frames=4)


def test_window_follows_n_in_the_graph_without_a_new_capture():
    moreg = ax.MoRegConfig(frames=4)
    cached = ax.transform(Probe(), ax.AdaCacheConfig(codebook=CODEBOOK, moreg=moreg))
    for n in (30, 60):
        trajectory = synthetic_trajectory([0.05 + 0.3 * (s % 3 == 0) for s in range(n)], seed=n)
        ax.reset(cached, num_steps=n)
        rep = _run(cached, trajectory)
        assert rep.computed_steps == _expected(trajectory, moreg)
        # outside the window the motion factor is 1 (no gradient after a constant 1)
        first, last = moreg.window_for(n)
        assert [r["motion"] for r in rep.steps if r["metric"] is not None and r.step < first] == pytest.approx(
            [1.0] * sum(1 for r in rep.steps if r["metric"] is not None and r.step < first))
    assert len(cached.programs) == 1
    # a window scaled to 60 steps differs from the 30-step one: the schedule depends on it
    trajectory = synthetic_trajectory([0.05 + 0.3 * (s % 3 == 0) for s in range(60)], seed=60)
    assert _expected(trajectory, moreg) != _expected(trajectory, ax.MoRegConfig(frames=4, window=(4, 26)))


def test_compiled_window_follows_n_without_recompiling():
    trajectories = {n: synthetic_trajectory([0.05 + 0.3 * (s % 3 == 0) for s in range(n)], seed=n)
                    for n in (30, 60, 45)}
    frames = {}
    for moreg in (ax.MoRegConfig(frames=4), ax.MoRegConfig(frames=4, window=(4, 26))):
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounter()
        cached = ax.transform(Probe(), ax.AdaCacheConfig(codebook=CODEBOOK, moreg=moreg))
        compiled = torch.compile(cached, backend=counter, fullgraph=True)
        for n in (30, 60, 45, 30):
            ax.reset(cached, num_steps=n)
            assert _run(compiled, trajectories[n]).computed_steps == _expected(trajectories[n], moreg)
        frames[moreg.window] = counter.frame_count
    # the first change of N makes the history length dynamic (one more frame, with or without MoReg);
    # a window scaled to N adds no compilation to a fixed one
    assert frames[None] == frames[(4, 26)] <= 2


def test_onnx_window_follows_n(tmp_path):
    pytest.importorskip("onnxruntime")
    from adacache_fx.export import OnnxRunner, to_onnx

    moreg = ax.MoRegConfig(frames=4)
    cached = ax.transform(Probe(), ax.AdaCacheConfig(num_steps=30, codebook=CODEBOOK, moreg=moreg))
    x = torch.zeros(1, 24, 5)
    to_onnx(cached, (x, x), tmp_path / "probe.onnx")
    runner = OnnxRunner(tmp_path / "probe.onnx")
    for n in (30, 60):
        trajectory = synthetic_trajectory([0.05 + 0.3 * (s % 3 == 0) for s in range(n)], seed=n)
        runner.reset(num_steps=n)
        for r in trajectory:
            runner(x, r)
        assert runner.report().computed_steps == _expected(trajectory, moreg)
