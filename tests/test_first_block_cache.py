"""FirstBlockCache in the graph: the published rule (a plain-Python reference here), diffusers' own hooks on
the same model (identical computed steps, equal outputs), torch.compile with 0 graph breaks, ONNX, bf16."""

import pytest
import torch
import torch._dynamo.testing
from helpers import first_tensor, max_diff

import adacache_fx as ax
from adacache_fx.config import config_from_dict
from adacache_fx.tools.fixtures import build

N = 16


def fbc_schedule(residuals: list[torch.Tensor], threshold: float) -> list[int]:
    """FirstBlockCache (ParaAttention / diffusers) on the first block's residual of every step: step 1
    computes; a later step computes iff mean|r - r_prev| / mean|r_prev| > threshold, where r_prev is the
    residual of the last compute step."""
    computed, kept = [], None
    for s, r in enumerate(residuals, start=1):
        r = r.double()
        if kept is None or float((r - kept).abs().mean() / kept.abs().mean()) > threshold:
            computed.append(s)
            kept = r
    return computed


def first_block_residuals(model, inputs: list[dict]) -> list[torch.Tensor]:
    """The first block's ``out - hidden_states`` at every step (it never depends on caching)."""
    seen = []
    handle = model.blocks[0].register_forward_hook(
        lambda m, args, kwargs, out: seen.append(out - kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    try:
        with torch.no_grad():
            for kwargs in inputs:
                model(**kwargs)
    finally:
        handle.remove()
    return seen


def diffusers_fbc(threshold: float, calls: list[tuple[str, dict]], dtype=torch.float32):
    """Outputs and computed steps (per context) of diffusers' FirstBlockCache on a fresh tiny Wan."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    model, _ = build("wan", dtype=dtype)
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
    hook = model.blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
    outs, computed, steps = [], {}, {}
    with torch.no_grad():
        for context, kwargs in calls:
            with model.cache_context(context):
                outs.append(model(**kwargs)[0])
                steps[context] = steps.get(context, 0) + 1
                if hook.state_manager.get_state().should_compute:
                    computed.setdefault(context, []).append(steps[context])
    return outs, computed


def ours(config, calls: list[tuple[str, dict]], dtype=torch.float32):
    model, _ = build("wan", dtype=dtype)
    cached = ax.transform(model, config)
    with torch.no_grad():
        outs = []
        for context, kwargs in calls:
            with cached.cache_context(context):
                outs.append(cached(**kwargs)[0])
    return cached, outs


def steps(n=N, contexts=("default",)):
    _, make_inputs = build("wan")
    calls = []
    for s in range(n):
        for context in contexts:
            kwargs = make_inputs(s)
            if context == "uncond":  # a text that changes every step: the first block's residual moves more
                text = kwargs["encoder_hidden_states"]
                kwargs["encoder_hidden_states"] = torch.randn(text.shape, generator=torch.Generator().manual_seed(s))
            calls.append((context, kwargs))
    return calls


@pytest.mark.parametrize("threshold,expected", [
    (0.05, [1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]), (0.08, [1, 6, 11, 12, 16]), (0.12, [1, 11, 16]),
])
def test_schedule_is_the_published_rule_and_equals_diffusers(threshold, expected):
    calls = steps()
    reference = fbc_schedule(first_block_residuals(build("wan")[0], [k for _, k in calls]), threshold)
    expected_outs, theirs = diffusers_fbc(threshold, calls)
    cached, got = ours(ax.FirstBlockCacheConfig(num_steps=N, threshold=threshold), calls)
    report = ax.report(cached)
    assert report.computed_steps == reference == theirs["default"] == expected
    assert report.regions == ["blocks.1..blocks.3"] and report.metric_sites == ["blocks.0 (block, early signal)"]
    assert report.steps[0]["diff"] is None and all(r["diff"] is not None for r in report.steps[1:])
    assert max_diff(got, expected_outs) < 1e-5


def test_cache_contexts_and_reset_follow_diffusers():
    calls = steps(12, ("cond", "uncond"))
    expected, theirs = diffusers_fbc(0.08, calls)
    cached, got = ours(ax.FirstBlockCacheConfig(num_steps=12, threshold=0.08), calls)
    assert ax.report(cached, "cond").computed_steps == theirs["cond"]
    assert ax.report(cached, "uncond").computed_steps == theirs["uncond"]
    assert theirs["cond"] != theirs["uncond"] and 2 < len(theirs["cond"]) < 12  # the contexts decide apart
    assert max_diff(got, expected) < 1e-5
    ax.reset(cached)  # a new generation forgets the kept residual: the same schedule again
    with torch.no_grad():
        again = []
        for context, kwargs in calls:
            with cached.cache_context(context):
                again.append(cached(**kwargs)[0])
    assert ax.report(cached, "cond").computed_steps == theirs["cond"]
    assert max_diff(again, got) == 0.0


def test_compiled_fullgraph_without_graph_breaks_and_onnx_schedule(tmp_path):
    calls = steps()
    config = ax.FirstBlockCacheConfig(num_steps=N, threshold=0.08)
    cached, eager = ours(config, calls)
    schedule = ax.report(cached).computed_steps
    assert schedule == [1, 6, 11, 12, 16]

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(cached, backend=counter, fullgraph=True)
    ax.reset(cached)
    with torch.no_grad():
        got = [compiled(**kwargs)[0] for _, kwargs in calls]
    assert counter.frame_count == 1 and dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert ax.report(cached).computed_steps == schedule
    assert max_diff(got, eager) < 1e-5

    pytest.importorskip("onnxruntime")
    from adacache_fx.export import OnnxRunner, read_metadata, to_onnx
    from adacache_fx.export.onnx import config_from_metadata

    ax.reset(cached)
    to_onnx(cached, calls[0][1], tmp_path / "fbc.onnx")
    assert config_from_metadata(read_metadata(tmp_path / "fbc.onnx")) == config
    runner = OnnxRunner(tmp_path / "fbc.onnx")
    exported = [first_tensor(runner(**kwargs)) for _, kwargs in calls]
    assert runner.report().computed_steps == schedule
    assert max_diff(exported, eager) < 1e-4


def test_bf16_decides_in_float32():
    calls = [(c, {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in kwargs.items()}) for c, kwargs in steps()]
    model, _ = build("wan", dtype=torch.bfloat16)
    reference = fbc_schedule(first_block_residuals(model, [k for _, k in calls]), 0.08)
    expected, theirs = diffusers_fbc(0.08, calls, torch.bfloat16)
    cached, got = ours(ax.FirstBlockCacheConfig(num_steps=N, threshold=0.08), calls, torch.bfloat16)
    assert got[0].dtype == torch.bfloat16
    assert cached.state()["diff"].dtype == torch.float32
    assert ax.report(cached).computed_steps == reference == theirs["default"]
    assert max_diff(got, expected) < 2e-2


def test_block_granularity_caches_the_same_residual_per_block():
    calls = steps()
    _, stack = ours(ax.FirstBlockCacheConfig(num_steps=N, threshold=0.08), calls)
    cached, per_block = ours(ax.FirstBlockCacheConfig(num_steps=N, threshold=0.08, granularity="block"), calls)
    assert ax.report(cached).regions == ["blocks.1", "blocks.2", "blocks.3"]
    assert ax.report(cached).computed_steps == [1, 6, 11, 12, 16]
    assert max_diff(per_block, stack) < 1e-5


def test_config_round_trips_and_refuses_what_does_not_apply():
    config = ax.FirstBlockCacheConfig(num_steps=30, threshold=0.1, extrapolation_order=1)
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="metric_block and metric_branch do not apply"):
        ax.FirstBlockCacheConfig(metric_block=2)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        ax.FirstBlockCacheConfig(threshold=-0.1)
