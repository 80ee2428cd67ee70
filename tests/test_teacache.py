"""TeaCache in the graph: the published rule (a plain-Python reference here) on the modulated input found
from the graph, outputs equal to a hand-cached run of the original model, cache contexts, torch.compile
with 0 graph breaks, ONNX, bf16, and the rescaling polynomial that ``calibrate_teacache`` fits.
diffusers has no TeaCache hook to compare with (huggingface/diffusers#12652 is not merged)."""

import numpy as np
import pytest
import torch
from helpers import assert_compiled_and_exported, first_tensor, hand_reference, max_diff, run_steps

import adacache_fx as ax
from adacache_fx.config import config_from_dict
from adacache_fx.tools.fixtures import build

N = 16
COEFFICIENTS = (10.0, 1.5, 0.0)  # a rescaling that is not the identity: 10 x^2 + 1.5 x


def published_schedule(signals: list[torch.Tensor], threshold: float, coefficients, warmup_steps: int = 0) -> list[int]:
    """TeaCache (official code) on the modulated input of every step: the first ``max(1, warmup)`` steps and
    the last compute and reset the accumulator; every other step adds ``poly(rel L1 change since the step
    before)`` and computes (resetting it) when the sum reaches ``threshold``."""
    n, acc, computed = len(signals), 0.0, []
    poly = np.poly1d(coefficients)
    for s in range(1, n + 1):
        if s <= max(1, warmup_steps) or s == n:
            acc = 0.0
            computed.append(s)
            continue
        now, before = signals[s - 1].double(), signals[s - 2].double()
        acc += float(poly(float((now - before).abs().mean() / before.abs().mean())))
        if acc >= threshold:
            acc = 0.0
            computed.append(s)
    return computed


def modulated_inputs(model, make_inputs, n: int) -> list[torch.Tensor]:
    """What the first block's query projection reads at every step (it never depends on caching)."""
    seen = []
    handle = model.blocks[0].attn1.to_q.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        run_steps(model, make_inputs, n)
    finally:
        handle.remove()
    return seen


def ours(config, dtype=torch.float32, n=N):
    model, make_inputs = build("wan", dtype=dtype)
    cached = ax.transform(model, config)
    return cached, run_steps(cached, make_inputs, n)


@pytest.mark.parametrize("threshold,warmup", [(0.15, 0), (0.3, 0), (0.3, 3)])
def test_schedule_is_the_published_rule_and_outputs_equal_a_hand_cached_run(threshold, warmup):
    model, make_inputs = build("wan")
    expected = published_schedule(modulated_inputs(model, make_inputs, N), threshold, COEFFICIENTS, warmup)
    config = ax.TeaCacheConfig(num_steps=N, threshold=threshold, coefficients=COEFFICIENTS, warmup_steps=warmup)
    cached, got = ours(config)
    report = ax.report(cached)
    assert report.computed_steps == expected and 3 < len(expected) < N - 2
    assert report.regions == ["blocks.0..blocks.3"]  # every block is skipped, the first included
    assert report.metric_sites == ["blocks.0 (modulated input, early signal)"]
    assert report.steps[0]["rel"] is None and all(r["rel"] > 0 for r in report.steps[1:])
    reference = hand_reference(build("wan")[0], make_inputs, N, expected, "stack")
    assert max_diff(got, reference) < 1e-5


def test_cache_contexts_keep_their_own_accumulator_and_reset_repeats():
    model, make_inputs = build("wan")
    config = ax.TeaCacheConfig(num_steps=12, threshold=0.2, coefficients=COEFFICIENTS)
    cached = ax.transform(model, config)

    def generation():
        outs = []
        with torch.no_grad():
            for s in range(12):
                for context, scale in (("cond", 1.0), ("uncond", 3.0)):  # uncond's input moves 3x as fast
                    kwargs = make_inputs(s)
                    kwargs["hidden_states"] = make_inputs(0)["hidden_states"] + scale * (
                        kwargs["hidden_states"] - make_inputs(0)["hidden_states"])
                    with cached.cache_context(context):
                        outs.append(first_tensor(cached(**kwargs)))
        return outs, ax.report(cached, "cond").computed_steps, ax.report(cached, "uncond").computed_steps

    first, cond, uncond = generation()
    assert len(cond) < len(uncond) < 12  # the contexts decide apart
    ax.reset(cached)
    again, cond_again, uncond_again = generation()
    assert (cond_again, uncond_again) == (cond, uncond) and max_diff(again, first) == 0.0


def test_compiled_fullgraph_without_graph_breaks_and_onnx(tmp_path):
    _, make_inputs = build("wan")
    config = ax.TeaCacheConfig(num_steps=N, threshold=0.3, coefficients=COEFFICIENTS, extrapolation_order=1)
    cached, eager = ours(config)
    schedule = ax.report(cached).computed_steps
    assert 3 < len(schedule) < N - 2
    assert_compiled_and_exported(cached, make_inputs, N, eager, schedule, tmp_path / "tea.onnx", if_nodes=1)
    from adacache_fx.export import read_metadata
    from adacache_fx.export.onnx import config_from_metadata

    assert config_from_metadata(read_metadata(tmp_path / "tea.onnx")) == config


def test_bf16_decides_in_float32():
    model, make_inputs = build("wan", dtype=torch.bfloat16)
    expected = published_schedule(modulated_inputs(model, make_inputs, N), 0.3, COEFFICIENTS)
    cached, got = ours(ax.TeaCacheConfig(num_steps=N, threshold=0.3, coefficients=COEFFICIENTS), torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and cached.state()["tea_acc"].dtype == torch.float32
    assert ax.report(cached).computed_steps == expected
    reference = hand_reference(build("wan", dtype=torch.bfloat16)[0], make_inputs, N, expected, "stack")
    assert max_diff(got, reference) < 2e-2


@pytest.mark.parametrize("granularity", ["block", "branch"])
def test_finer_granularities_skip_the_same_steps(granularity):
    config = ax.TeaCacheConfig(num_steps=N, threshold=0.3, coefficients=COEFFICIENTS)
    stack, expected = ours(config)
    cached, got = ours(ax.TeaCacheConfig(num_steps=N, threshold=0.3, coefficients=COEFFICIENTS,
                                         granularity=granularity))
    assert ax.report(cached).computed_steps == ax.report(stack).computed_steps
    assert len(ax.report(cached).regions) == (4 if granularity == "block" else 12)
    assert max_diff(got, expected) < 1e-5


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan_video", "flux"])
def test_the_modulated_input_is_found_in_other_families(family):
    """The signal is the input of block 0's query projection, whatever the model calls it (CogVideoX: the
    text and video tokens concatenated; HunyuanVideo and Flux: modulated by a linear adaLN of the block)."""
    model, make_inputs = build(family)
    to_q = next(m for name, m in model.transformer_blocks[0].named_modules() if name.endswith("to_q"))
    seen = []
    handle = to_q.register_forward_pre_hook(lambda m, args: seen.append(args[0].double()))
    expected = run_steps(model, make_inputs, 6)
    handle.remove()
    cached = ax.transform(model, ax.TeaCacheConfig(num_steps=6, threshold=0.0))  # every step computes
    assert max_diff(run_steps(cached, make_inputs, 6), expected) < 1e-5
    report = ax.report(cached)
    assert report.metric_sites == ["transformer_blocks.0 (modulated input, early signal)"]
    assert report.regions[0].startswith("transformer_blocks.0")  # the first block is cached too
    changes = [float((now - before).abs().sum() / before.abs().sum()) for before, now in zip(seen, seen[1:])]
    np.testing.assert_allclose([r["rel"] for r in report.steps[1:]], changes, rtol=1e-4)


def test_skipped_steps_skip_every_block_of_a_two_stream_model():
    """CogVideoX (text and video streams, adaLN modulation by a linear in the block): a cached step adds
    the stack's residual on both streams, as a hand-cached run of the original model."""
    model, make_inputs = build("cogvideox")
    config = ax.TeaCacheConfig(num_steps=N, threshold=0.5, coefficients=COEFFICIENTS)
    cached = ax.transform(model, config)
    got = run_steps(cached, make_inputs, N)
    computed = ax.report(cached).computed_steps
    assert 3 < len(computed) < N - 2
    assert max_diff(got, hand_reference(build("cogvideox")[0], make_inputs, N, computed, "stack")) < 1e-5


def test_a_stream_read_directly_by_the_first_linear_is_the_signal():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return x + self.proj(x)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.blocks = torch.nn.Linear(4, 8), torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            x = self.embed(x)
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model, inputs = Model(), [torch.randn(1, 3, 4) * (1 + 0.1 * s) for s in range(4)]
    cached = ax.transform(model, ax.TeaCacheConfig(num_steps=4, threshold=0.0))
    with torch.no_grad():
        assert max(float((cached(x) - model(x)).abs().max()) for x in inputs) < 1e-6
        embedded = [model.embed(x) for x in inputs]
    changes = [float((b - a).abs().sum() / a.abs().sum()) for a, b in zip(embedded, embedded[1:])]
    np.testing.assert_allclose([r["rel"] for r in ax.report(cached).steps[1:]], changes, rtol=1e-5)


def test_a_nan_change_computes_and_resets_the_accumulator():
    """TeaCache skips only while ``acc < threshold``: a NaN accumulator computes, then starts again at 0."""
    from adacache_fx.policies.replay import schedule
    from adacache_fx.policies.teacache import TeaCachePolicy

    config = ax.TeaCacheConfig(num_steps=10, threshold=0.25)
    policy = TeaCachePolicy(config)
    nan_parts = [torch.tensor([float("nan"), 1.0])]
    state = {"tea_rel": torch.tensor(0.1), "tea_acc": torch.tensor(0.1)}
    s, compute, state = policy.decide(torch.tensor(3), torch.tensor(10), state, nan_parts)
    assert int(s) == 4 and bool(compute)
    state, _ = policy.update(s, compute, nan_parts, state, torch.tensor(10))
    assert float(state["tea_acc"]) == 0.0
    changes = [0.1, 0.1, float("nan"), 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]  # steps 2..10; the replay runs the policy
    assert schedule(config, changes, 10) == [1, 4, 7, 10]


def test_a_signal_written_in_place_is_refused():
    from adacache_fx.passes import PassError

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

        def forward(self, x, t):
            h = self.norm(x)
            h.mul_(1 + t)  # the modulation written into the normalized tensor
            return x + self.proj(h)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x, t):
            for block in self.blocks:
                x = block(x, t)
            return x

    with pytest.raises((PassError, ax.TransformError), match="written in place"):
        cached = ax.transform(Model(), ax.TeaCacheConfig(num_steps=4))
        cached(torch.randn(1, 3, 8), torch.ones(1, 1, 1))


def test_calibrate_teacache_fits_output_change_against_input_change():
    from adacache_fx.tools.reference.pipeline import ReferencePipeline

    pipe = ReferencePipeline.from_reference()
    coefficients = ax.calibrate_teacache(pipe, ["a large red circle moving right fast"], 8, degree=2)
    assert pipe.transformer is not None and not isinstance(pipe.transformer, ax.CachedModel)  # restored
    # the same pairs, read by hooks on the untransformed model
    inputs, outputs = [], []
    first = next(m for n, m in pipe.transformer.named_children() if n.endswith("blocks"))[0]
    to_q = next(m for name, m in first.named_modules() if name.endswith("to_q"))  # its modulated input
    h1 = to_q.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().double()))
    h2 = pipe.transformer.register_forward_hook(lambda m, args, kwargs, out: outputs.append(
        first_tensor(out).detach().double()), with_kwargs=True)
    try:
        pipe(prompt="a large red circle moving right fast", num_inference_steps=8,
             generator=torch.Generator().manual_seed(0))
    finally:
        h1.remove()
        h2.remove()

    def rel(now, before):
        return float((now - before).abs().sum() / before.abs().sum())

    calls = len(outputs)
    assert calls == len(inputs) and calls % 8 == 0
    contexts = calls // 8  # CFG: the contexts alternate within a step
    xs, ys = [], []
    for c in range(contexts):
        seq_in, seq_out = inputs[c::contexts], outputs[c::contexts]
        xs += [rel(seq_in[s], seq_in[s - 1]) for s in range(1, 8)]
        ys += [rel(seq_out[s], seq_out[s - 1]) for s in range(1, 8)]
    np.testing.assert_allclose(coefficients, np.polyfit(xs, ys, 2), rtol=1e-3, atol=1e-4)


def test_fit_teacache_threshold_replays_the_rule():
    from dataclasses import replace

    from adacache_fx.calibrate import fit_teacache_threshold
    from adacache_fx.policies.replay import schedule

    signal = [float("nan")] + [0.1] * 10  # N = 11, the input changes by 0.1 per step; identity polynomial
    config = ax.TeaCacheConfig(num_steps=11)
    assert schedule(replace(config, threshold=0.2), signal[1:], 11) == [1, 3, 5, 7, 9, 11]
    assert schedule(replace(config, threshold=0.3, warmup_steps=3), signal[1:], 11) == [1, 2, 3, 6, 9, 11]
    threshold = fit_teacache_threshold([signal], config, 11 / 6)
    assert 0.1 < threshold <= 0.2 + 1e-9  # the smallest threshold that computes every other step
    assert schedule(replace(config, threshold=threshold), signal[1:], 11) == [1, 3, 5, 7, 9, 11]
    with pytest.raises(ValueError, match="target speedup must be a number in"):
        fit_teacache_threshold([signal], config, 8.0)


def test_config_round_trips_and_refuses_what_does_not_apply():
    config = ax.TeaCacheConfig(num_steps=30, threshold=0.2, coefficients=[3, 2, 1], extrapolation_order=1)
    assert config.coefficients == (3.0, 2.0, 1.0)
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="metric_block and metric_branch do not apply"):
        ax.TeaCacheConfig(metric_block=2)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        ax.TeaCacheConfig(threshold=-0.1)
    with pytest.raises(ValueError, match="coefficients must be finite"):
        ax.TeaCacheConfig(coefficients=())
