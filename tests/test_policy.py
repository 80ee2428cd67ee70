"""The in-graph AdaCache decision equals a plain-Python reference on the same residual trajectories."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference_adacache import schedule
from torch import nn

import adacache_fx as ax
from adacache_fx import presets
from adacache_fx.tools.fixtures import build


def record_trajectory(model, make_inputs, num_steps, **config):
    """Metric residual at every step (all steps computed), read from the transform's state."""
    recorder = ax.transform(model, ax.AdaCacheConfig(num_steps=num_steps, codebook=presets.NEVER, **config))
    trajectory = []
    with torch.no_grad():
        for s in range(num_steps):
            recorder(**make_inputs(s))
            trajectory.append(recorder.state()["p_prev_0"].clone())
    return trajectory, recorder.program().rewrite.frame_layout


def run_schedule(model, make_inputs, num_steps, **config):
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=num_steps, **config))
    with torch.no_grad():
        for s in range(num_steps):
            cached(**make_inputs(s))
    return ax.report(cached)


@pytest.mark.parametrize("family", ["wan", "stdit"])
@pytest.mark.parametrize(
    "codebook,moreg",
    [(presets.FAST_30, None), (presets.SLOW_30, None), (presets.FAST_30, ax.MoRegConfig(window=(3, 27)))],
    ids=["fast", "slow", "fast-moreg"],
)
def test_schedule_matches_reference_on_model_trajectories(family, codebook, moreg):
    # random-weight residuals change faster than trained ones: scale the thresholds to this model
    scale = {"wan": 2.0, "stdit": 4.0}[family]
    codebook = {t * scale: r for t, r in codebook.items()}
    model, make_inputs = build(family)
    trajectory, layout = record_trajectory(model, make_inputs, 30, moreg=moreg)
    batch, frames = layout if layout else (1, None)
    expected = schedule(trajectory, 30, dict(codebook), moreg=moreg, batch=batch, frames=frames)
    got = run_schedule(model, make_inputs, 30, codebook=codebook, moreg=moreg)
    assert got.computed_steps == expected
    if moreg is None:
        assert 3 < got.num_computed < 30  # the trajectory exercises both computing and caching


class ProbeBlock(nn.Module):
    def forward(self, x, r):
        return x + (x * 0 + r)  # the residual branch is exactly the input r


class Probe(nn.Module):
    """A DiT whose metric residual is an input, so that a test can dictate the trajectory."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(ProbeBlock() for _ in range(3))

    def forward(self, x, r):
        for block in self.blocks:
            x = block(x, r)
        return x


def synthetic_trajectory(changes, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(1, 4 * 6, 5, generator=g)
    trajectory = []
    for change in changes:
        noise = torch.randn(r.shape, generator=g)
        r = r + change * noise * r.abs().mean() / noise.abs().mean()
        trajectory.append(r.clone())
    return trajectory


def margin(metrics, codebook):
    thresholds = list(codebook)
    return min((abs(c - t) / t for _, c in metrics for t in thresholds), default=1.0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.lists(st.floats(0.0, 0.8), min_size=30, max_size=30),
    seed=st.integers(0, 10_000),
    preset=st.sampled_from(["fast", "slow", "fast_moreg", "fast_100"]),
    warmup=st.sampled_from([0, 0, 3, 6]),
)
def test_schedule_matches_reference_on_synthetic_trajectories(changes, seed, preset, warmup):
    codebook = presets.FAST_100 if preset == "fast_100" else presets.SLOW_30 if preset == "slow" else presets.FAST_30
    moreg = ax.MoRegConfig(frames=4, strides=(1, 2), window=(2, 25)) if preset == "fast_moreg" else None
    trajectory = synthetic_trajectory(changes, seed)
    expected, metrics = schedule(trajectory, 30, dict(codebook), moreg=moreg, batch=1, frames=4, return_metrics=True,
                                 warmup_steps=warmup)
    assume(margin(metrics, codebook) > 1e-4)  # float32 vs float64 may only differ at a threshold
    model = Probe()
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=30, codebook=codebook, moreg=moreg,
                                                   warmup_steps=warmup))
    x = torch.zeros(1, 24, 5)
    with torch.no_grad():
        for r in trajectory:
            cached(x, r)
    rep = ax.report(cached)
    assert rep.computed_steps == expected
    assert set(range(1, warmup + 1)) <= set(rep.computed_steps)
    for s, c in metrics:
        assert rep.steps[s - 1]["metric"] == pytest.approx(c, rel=1e-4)


def test_extrapolation_weight_over_two_generations():
    from adacache_fx.policies.forecast import ExtrapolationWeight

    weight = ExtrapolationWeight()
    last = prev = torch.tensor(0)
    # a generation computing steps 1, 4, 5, 8, 9, then a new one computing 1, 2
    steps = [(s, s in (1, 4, 5, 8, 9)) for s in range(1, 10)] + [(1, True), (2, True), (3, False)]
    got = []
    for s, compute in steps:
        w, last, prev = weight(torch.tensor(s), torch.tensor(compute), last, prev)
        got.append(float(w))
    # steps 2-3 follow one compute step (w = 0); 6-7 extrapolate from 4 and 5; 9 from 5 and 8
    # (computed: w unused); the second generation forgets the first: its step 3 extrapolates from 1 and 2
    assert got[1:3] == [0.0, 0.0]
    assert got[5:7] == [1.0, 2.0]
    assert got[8] == pytest.approx(1 / 3)
    assert got[11] == 1.0 and got[9] == 0.0 and got[10] == 0.0
    assert w.dtype == torch.float32
