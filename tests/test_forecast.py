"""Forecast order 2 (TaylorSeer's second order) against a hand-written reference, compiled and ONNX."""

import math

import pytest
import torch
from helpers import assert_compiled_and_exported, block_list, first_tensor, max_diff, run_steps, stream_inputs, tensors

import adacache_fx as ax
from adacache_fx.policies.forecast import TaylorWeights
from adacache_fx.tools.fixtures import build, tiny_dit

N = 12
COMPUTE_STEPS = (1, 2, 4, 7, 8, 12)  # non-uniform intervals; step 3 has two computed steps behind it


def taylor(residuals, steps, s):
    """diffusers' ``TaylorSeerState`` with ``max_order=2`` by hand: factors from the stored residuals
    ``r`` of the compute steps ``steps`` (oldest first), then ``sum_n F_n k**n / n!``."""
    factors = None
    for i, r in enumerate(residuals):
        new = [r]
        if factors is not None:
            delta = steps[i] - steps[i - 1]
            for prev in factors[:2]:
                new.append((new[-1] - prev) / delta)
        factors = new
    k = s - steps[-1]
    return sum(f * (k**n / math.factorial(n)) for n, f in enumerate(factors))


@torch.no_grad()
def second_order_reference(model, make_inputs, granularity):
    """The uncached model; on cached steps each block (or the stack) adds its residual forecast from the
    residuals of its last three compute steps (branch residuals add up to the block's: forecasting is
    linear in them)."""
    blocks = list(block_list(model))
    stored: dict = {}  # key -> residual lists of the compute steps, oldest first
    computed, outputs, stack_in = [], [], {}

    def hook(i, s, compute):
        def fn(module, args, kwargs, output):
            outs = tensors(output)
            ins = stream_inputs(args, kwargs, outs)
            per_block = granularity != "stack"
            if not per_block and i == 0:
                stack_in["x"] = ins
            key, last = (i, True) if per_block else ("stack", i == len(blocks) - 1)
            base = ins if per_block else stack_in["x"]
            if compute:
                if last:
                    stored.setdefault(key, []).append([o - x for o, x in zip(outs, base)])
                return output
            if last:
                history = stored[key][-3:]
                new = [x + taylor([h[j] for h in history], computed[-len(history):], s) for j, x in enumerate(base)]
            else:  # inside the stack on a cached step: pass the input on
                new = ins
            return tuple(new) if isinstance(output, tuple) else new[0]

        return fn

    for s in range(1, N + 1):
        compute = s in COMPUTE_STEPS
        handles = [b.register_forward_hook(hook(i, s, compute), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            outputs.append(first_tensor(model(**make_inputs(s - 1))).clone())
        finally:
            for h in handles:
                h.remove()
        if compute:
            computed.append(s)
    return outputs


def test_taylor_weights_by_hand():
    weights = TaylorWeights()
    last = prev = older = torch.tensor(0)
    got = {}
    for s in [*range(1, N + 1), 1, 2, 3]:  # then a new generation computing 1, 2
        compute = s in COMPUTE_STEPS or len(got) >= N
        u, v, last, prev, older = weights(torch.tensor(s), torch.tensor(compute), last, prev, older)
        got.setdefault(s, (float(u), float(v)))
    assert got[2] == (0.0, 0.0)  # one step behind: reuse
    assert got[3] == (1.0, 0.0)  # two: linear, k / d0
    # three (1, 2, 4): d0 = 2, d1 = 1; u = k/d0 + k^2/(2 d0^2), v = -k^2/(2 d0 d1)
    assert got[5] == (0.5 + 1 / 8, -1 / 4) and got[6] == (1.0 + 4 / 8, -1.0)
    assert got[9] == pytest.approx((1.0 + 1 / 2, -1 / 6), rel=1e-7) and got[11] == (3.0 + 9 / 2, -9 / 6)  # (4, 7, 8): d0 = 1, d1 = 3
    assert u.dtype == v.dtype == torch.float32
    assert (float(u), float(v)) == (1.0, 0.0)  # the new generation forgot the old steps: linear from 1, 2


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
@pytest.mark.parametrize("granularity", ["stack", "block", "branch"])
def test_second_order_equals_hand_reference(family, granularity):
    model, make_inputs = build(family)
    expected = second_order_reference(model, make_inputs, granularity)
    config = ax.AdaCacheConfig(num_steps=N, compute_steps=COMPUTE_STEPS, granularity=granularity,
                               extrapolation_order=2)
    cached = ax.transform(model, config)
    got = run_steps(cached, make_inputs, N)
    again = run_steps(cached, make_inputs, N)  # a second generation forgets the first one's residuals
    assert ax.report(cached).computed_steps == list(COMPUTE_STEPS)
    assert max_diff(got, expected) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    linear = run_steps(ax.transform(model, ax.AdaCacheConfig(num_steps=N, compute_steps=COMPUTE_STEPS,
                                                              granularity=granularity, extrapolation_order=1)),
                       make_inputs, N)
    assert torch.equal(got[2], linear[2])  # step 3: two steps behind, order 2 is order 1
    assert float((got[5] - linear[5]).abs().max()) > 1e-4  # step 6: the second order term is not vacuous


def test_second_order_compiled_and_onnx(tmp_path):
    import torch._dynamo.testing

    model, make_inputs = tiny_dit()
    config = ax.AdaCacheConfig(num_steps=N, compute_steps=COMPUTE_STEPS, extrapolation_order=2, granularity="block")
    cached = ax.transform(model, config)
    eager = run_steps(cached, make_inputs, N)
    state = cached.state()
    assert int(state["older_compute"]) == 7 and "cache_older_0_0" in state

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(cached, backend=counter, fullgraph=True)
    ax.reset(cached)
    assert max_diff(run_steps(compiled, make_inputs, N), eager) < 1e-5
    assert counter.frame_count == 1 and dict(torch._dynamo.utils.counters["graph_break"]) == {}

    pytest.importorskip("onnxruntime")
    from adacache_fx.export import OnnxRunner, to_onnx

    ax.reset(cached)
    to_onnx(cached, make_inputs(0), tmp_path / "order2.onnx")
    runner = OnnxRunner(tmp_path / "order2.onnx")
    assert max_diff([runner(**make_inputs(s)) for s in range(N)], eager) < 1e-4
    assert runner.report().computed_steps == list(COMPUTE_STEPS)


@pytest.mark.parametrize("order", [1, 2])
def test_fitted_gain_compiled_and_onnx(tmp_path, order):
    model, make_inputs = tiny_dit()
    config = ax.AdaCacheConfig(num_steps=N, compute_steps=COMPUTE_STEPS, extrapolation_order=order,
                               forecast_gain="fit", granularity="block")
    cached = ax.transform(model, config)
    eager = run_steps(cached, make_inputs, N)
    gain = float(cached.state()["forecast_gain"])
    assert 0.0 < gain < 1.0  # fitted, not clamped
    full = run_steps(ax.transform(model, ax.AdaCacheConfig(num_steps=N, compute_steps=COMPUTE_STEPS,
                                                            extrapolation_order=order, granularity="block")),
                     make_inputs, N)
    assert float((eager[N - 2] - full[N - 2]).abs().max()) > 1e-6  # step 11 adds less than the whole forecast
    # the next generation (no reset: it starts after N steps) starts from the whole forecast again
    assert all(torch.equal(a, b) for a, b in zip(run_steps(cached, make_inputs, N), eager))
    assert_compiled_and_exported(cached, make_inputs, N, eager, list(COMPUTE_STEPS), tmp_path / "fit.onnx")
    assert float(cached.state()["forecast_gain"]) == pytest.approx(gain, abs=1e-6)


def test_fitted_gain_in_bf16_is_fitted_in_float32():
    model, make_inputs = tiny_dit()
    model = model.to(torch.bfloat16)

    def inputs(s):
        return {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in make_inputs(s).items()}

    config = ax.AdaCacheConfig(num_steps=N, compute_steps=COMPUTE_STEPS, extrapolation_order=1, forecast_gain="fit")
    cached = ax.transform(model, config)
    out = run_steps(cached, inputs, N)
    fp32 = ax.transform(tiny_dit()[0], config)
    reference_gain = (run_steps(fp32, make_inputs, N), float(fp32.state()["forecast_gain"]))[1]
    gain = cached.state()["forecast_gain"]
    assert gain.dtype == torch.float32 and out[-1].dtype == torch.bfloat16
    assert float(gain) == pytest.approx(reference_gain, abs=0.05) and 0.0 < float(gain) < 1.0
