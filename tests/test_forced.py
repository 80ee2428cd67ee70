"""A forced schedule equals an eager reference that adds the cached residuals by hand."""

import pytest
import torch
from helpers import first_tensor, hand_reference

import adacache_fx as ax
from adacache_fx.tools.fixtures import build, tiny_dit

COMPUTE_STEPS = (1, 2, 5, 6, 9)


@pytest.mark.parametrize("family", ["wan", "cogvideox", "stdit"])
@pytest.mark.parametrize("granularity", ["stack", "block", "branch"])
def test_forced_schedule_equals_hand_reference(family, granularity):
    model, make_inputs = build(family)
    expected = hand_reference(model, make_inputs, 10, COMPUTE_STEPS, granularity)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=10, compute_steps=COMPUTE_STEPS, granularity=granularity))
    with torch.no_grad():
        got = [first_tensor(cached(**make_inputs(s))).clone() for s in range(10)]
    assert ax.report(cached).computed_steps == list(COMPUTE_STEPS)
    for s in range(10):
        assert float((expected[s] - got[s]).abs().max()) < 1e-5, f"step {s + 1}"
    # the cached steps really differ from an uncached run, so the comparison above is not vacuous
    with torch.no_grad():
        plain = first_tensor(model(**make_inputs(3)))
    assert float((plain - got[3]).abs().max()) > 1e-4


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
@pytest.mark.parametrize("granularity", ["stack", "block", "branch"])
def test_linear_extrapolation_equals_hand_reference(family, granularity):
    model, make_inputs = build(family)
    expected = hand_reference(model, make_inputs, 10, COMPUTE_STEPS, granularity, extrapolate=True)
    reused = hand_reference(model, make_inputs, 10, COMPUTE_STEPS, granularity)
    config = ax.AdaCacheConfig(num_steps=10, compute_steps=COMPUTE_STEPS, granularity=granularity,
                               extrapolation_order=1)
    cached = ax.transform(model, config)
    with torch.no_grad():
        got = [first_tensor(cached(**make_inputs(s))).clone() for s in range(10)]
        got_again = [first_tensor(cached(**make_inputs(s))).clone() for s in range(10)]  # a second generation
    for s in range(10):
        assert float((expected[s] - got[s]).abs().max()) < 1e-5, f"step {s + 1}"
        assert torch.equal(got[s], got_again[s]), f"step {s + 1} of the second generation"
    # extrapolating differs from reusing, so the comparison above is not vacuous
    assert float((got[2] - reused[2]).abs().max()) > 1e-4


@pytest.mark.parametrize("family", ["tiny", "wan"])
@pytest.mark.parametrize("granularity", ["stack", "block"])
@pytest.mark.parametrize("gain", [0.5, "fit"])
def test_forecast_gain_equals_hand_reference(family, granularity, gain):
    # one block output each: the hand reference fits over the block outputs, the graph over the live ones
    model, make_inputs = tiny_dit() if family == "tiny" else build(family)
    steps = (1, 2, 3, 5, 7, 9)
    expected = hand_reference(model, make_inputs, 10, steps, granularity, extrapolate=True, gain=gain)
    full = hand_reference(model, make_inputs, 10, steps, granularity, extrapolate=True)
    reused = hand_reference(model, make_inputs, 10, steps, granularity)
    config = ax.AdaCacheConfig(num_steps=10, compute_steps=steps, granularity=granularity,
                               extrapolation_order=1, forecast_gain=gain)
    cached = ax.transform(model, config)
    gains = []
    with torch.no_grad():
        got = []
        for s in range(10):
            got.append(first_tensor(cached(**make_inputs(s))).clone())
            gains.append(float(cached.state()["forecast_gain"]) if gain == "fit" else gain)
    for s in range(10):
        assert float((expected[s] - got[s]).abs().max()) < 1e-5, f"step {s + 1}"
    # the gain changes what a cached step adds: neither the whole forecast nor reuse
    cached_steps = [s for s in range(1, 10) if s + 1 not in steps and 0.0 < gains[s - 1] < 1.0]
    if family == "wan" and gain == "fit":  # the random Wan forecasts badly: every fit clamps to 0 (reuse)
        assert gains[2:] == [0.0] * 8 and all(torch.equal(g, r) for g, r in zip(got[3:], reused[3:]))
        return
    assert cached_steps, gains  # the tiny DiT's fits land in (0, 1)
    for s in cached_steps:
        assert float((got[s] - full[s]).abs().max()) > 1e-6 and float((got[s] - reused[s]).abs().max()) > 1e-6


def test_forecast_gain_is_validated():
    with pytest.raises(ValueError, match="forecast_gain needs a forecast"):
        ax.AdaCacheConfig(forecast_gain=0.5)
    for bad in (1.5, -0.1, "auto", True):
        with pytest.raises(ValueError, match="forecast_gain must be"):
            ax.AdaCacheConfig(extrapolation_order=1, forecast_gain=bad)
    config = ax.AdaCacheConfig(extrapolation_order=2, forecast_gain="fit")
    assert ax.AdaCacheConfig.from_dict(config.to_dict()) == config
