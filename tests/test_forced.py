"""A forced schedule equals an eager reference that adds the cached residuals by hand."""

import pytest
import torch
from helpers import first_tensor, hand_reference

import adacache_fx as ax
from adacache_fx.tools.fixtures import build

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
