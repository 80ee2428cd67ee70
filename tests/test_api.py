"""The stateful module behaves like the model; contexts, resets, reports; bad input gets clear errors."""

import warnings

import pytest
import torch
from helpers import first_tensor, hand_reference, max_diff, run_steps
from torch import nn

import adacache_fx as ax
from adacache_fx import presets
from adacache_fx.tools.fixtures import build


@pytest.fixture(scope="module")
def wan():
    return build("wan")


def test_behaves_like_the_wrapped_model(wan):
    model, make_inputs = wan
    cached = ax.transform(model)
    assert cached.config is model.config
    assert cached.dtype == model.dtype and cached.device == model.device
    assert list(cached.state_dict()) == list(model.state_dict())
    assert "adacache" not in " ".join(cached.state_dict())
    ax.reset(cached, num_steps=5)
    kwargs = make_inputs(0)
    kwargs["return_dict"] = True
    with torch.no_grad():
        out = cached(**kwargs)
        ref = model(**kwargs)
    assert type(out) is type(ref)
    assert torch.equal(out.sample, ref.sample)


def test_default_config_is_the_fast_preset():
    assert dict(ax.AdaCacheConfig().codebook) == dict(presets.FAST_30)


def test_generation_restarts_after_num_steps(wan):
    model, make_inputs = wan
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=8, codebook={10.0: 3}))
    first = run_steps(cached, make_inputs, 8)
    schedule = ax.report(cached).computed_steps
    second = run_steps(cached, make_inputs, 8)
    assert ax.report(cached).computed_steps == schedule == [1, 2, 5, 7, 8]
    assert max_diff(first, second) == 0.0


def test_reset_starts_a_new_generation(wan):
    model, make_inputs = wan
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=8, codebook={10.0: 3}))
    run_steps(cached, make_inputs, 3)
    ax.reset(cached)
    outs = run_steps(cached, make_inputs, 8)
    assert ax.report(cached).computed_steps == [1, 2, 5, 7, 8]
    fresh = ax.transform(model, ax.AdaCacheConfig(num_steps=8, codebook={10.0: 3}))
    assert max_diff(outs, run_steps(fresh, make_inputs, 8)) == 0.0


def test_cache_contexts_keep_separate_state(wan):
    model, make_inputs = wan
    config = ax.AdaCacheConfig(num_steps=8)
    single = ax.transform(model, config)
    alone = run_steps(single, make_inputs, 8)
    cfg_model = ax.transform(model, config)
    cond, uncond = [], []
    with torch.no_grad():
        for s in range(8):
            with cfg_model.cache_context("cond"):
                cond.append(first_tensor(cfg_model(**make_inputs(s))).clone())
            with cfg_model.cache_context("uncond"):
                kwargs = make_inputs(s)
                kwargs["encoder_hidden_states"] = torch.zeros_like(kwargs["encoder_hidden_states"])
                uncond.append(first_tensor(cfg_model(**kwargs)).clone())
    assert max_diff(alone, cond) == 0.0  # interleaved uncond calls did not disturb the cond cache
    assert ax.report(cfg_model, "cond").computed_steps == ax.report(single).computed_steps
    assert ax.report(cfg_model, "uncond").num_steps == 8


def test_report_counts_and_memory(wan):
    model, make_inputs = wan
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=6, compute_steps=(1, 3, 6)))
    run_steps(cached, make_inputs, 6)
    rep = ax.report(cached)
    assert [r.step for r in rep.steps] == [1, 2, 3, 4, 5, 6]
    assert [r.computed for r in rep.steps] == [True, False, True, False, False, True]
    assert rep.steps[0]["metric"] is None and rep.steps[2]["metric"] is not None and rep.steps[1]["metric"] is None
    hidden = 1 * 32 * 32 * 4  # [1, 32 tokens, 32 channels] float32, one stream cache + the metric residual
    assert rep.cache_bytes == 2 * hidden
    assert "3/6 steps computed" in str(rep)


def test_extrapolation_keeps_a_second_residual(wan):
    model, make_inputs = wan
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=6, compute_steps=(1, 3, 6), extrapolation_order=1))
    run_steps(cached, make_inputs, 6)
    hidden = 1 * 32 * 32 * 4
    assert ax.report(cached).cache_bytes == 3 * hidden  # residual, the one before it, the metric residual
    assert ax.report(cached).computed_steps == [1, 3, 6]


def test_missing_num_steps_is_a_clear_error(wan):
    model, make_inputs = wan
    cached = ax.transform(model)
    with pytest.raises(ValueError, match="number of denoising steps"), torch.no_grad():
        cached(**make_inputs(0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"codebook": {}}, "empty"),
        ({"codebook": {0.3: 2, 0.1: 4}}, "increasing"),
        ({"codebook": {0.1: 0}}, "rates"),
        ({"num_steps": 2}, ">= 3"),
        ({"granularity": "layer"}, "granularity"),
        ({"compute_steps": (2, 3)}, "step 1"),
        ({"extrapolation_order": 3}, "extrapolation_order"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2, "compute_steps": (1, 3)}, "forced schedule"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ax.AdaCacheConfig(**kwargs)


def test_reset_refuses_too_few_steps(wan):
    with pytest.raises(ValueError, match=">= 3"):
        ax.reset(ax.transform(wan[0]), num_steps=1)


def test_model_without_block_stack_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=5))
    with pytest.raises(ax.TransformError, match="no transformer block stack"), torch.no_grad():
        cached(torch.randn(2, 4))


def test_transform_refuses_non_modules_and_double_transform(wan):
    with pytest.raises(TypeError):
        ax.transform(lambda x: x)
    with pytest.raises(ValueError, match="already"):
        ax.transform(ax.transform(wan[0]))


def test_new_shape_mid_generation_is_refused_and_cache_untouched(wan):
    model, make_inputs = wan
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=6))
    run_steps(cached, make_inputs, 2)
    before = {k: v.clone() for k, v in cached.state().items()}
    kwargs = make_inputs(2)
    kwargs["hidden_states"] = torch.randn(1, 4, 2, 16, 16)
    with pytest.raises(ValueError, match="middle of a generation"), torch.no_grad():
        cached(**kwargs)
    after = cached.state()
    assert all(torch.equal(before[k], after[k]) or k == "history" for k in before)
    # after a reset the new shape starts its own generation
    ax.reset(cached)
    with torch.no_grad():
        cached(**kwargs)
    assert ax.report(cached).computed_steps == [1]


@pytest.mark.parametrize("family", ["wan", "stdit"])
def test_bf16(family):
    model, make_inputs = build(family, dtype=torch.bfloat16)
    exact = ax.transform(model, ax.AdaCacheConfig(num_steps=6, codebook=presets.NEVER))
    # bitwise in bf16 too (stdit's stack was a bf16 rounding step off while region outputs were made
    # contiguous; they keep the model's layout now)
    tolerance = 0.0
    assert max_diff(run_steps(model, make_inputs, 6), run_steps(exact, make_inputs, 6)) == tolerance
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=12, codebook={10.0: 3}, moreg=ax.MoRegConfig()))
    outs = run_steps(cached, make_inputs, 12)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    rep = ax.report(cached)
    assert cached.state()["history"].dtype == torch.float32
    assert all(r["metric"] is not None and r["metric"] == r["metric"] for r in rep.steps if r.computed and r.step > 1)
    assert rep.num_computed < 12
    # linear extrapolation in bf16 (its weight cast to bf16): a bf16 rounding step from the float reference
    forced = ax.transform(model, ax.AdaCacheConfig(num_steps=8, compute_steps=(1, 2, 5, 8), extrapolation_order=1))
    expected = hand_reference(model, make_inputs, 8, (1, 2, 5, 8), "stack", extrapolate=True)
    got = run_steps(forced, make_inputs, 8)
    assert all(o.dtype == torch.bfloat16 for o in got)
    assert max_diff(got, expected) <= 2 * tolerance + 2**-6


@pytest.mark.parametrize(
    "family,frames", [("wan", 2), ("cogvideox", 2), ("latte", 2), ("mochi", 2), ("allegro", 2), ("stdit", 4)]
)
def test_moreg_frame_layout_is_inferred_from_the_patch_embedding(family, frames):
    model, make_inputs = build(family)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, moreg=ax.MoRegConfig()))
    run_steps(cached, make_inputs, 1)
    assert cached.program().rewrite.frame_layout == (1, frames)


def test_moreg_without_patch_convolution_needs_the_frame_count():
    model, make_inputs = build("ltx_video")  # packed tokens, linear patchify: nothing to infer T from
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, moreg=ax.MoRegConfig()))
    with pytest.raises(ax.TransformError, match=r"MoRegConfig\(frames=T\)"), torch.no_grad():
        cached(**make_inputs(0))
    forced = ax.transform(model, ax.AdaCacheConfig(num_steps=4, moreg=ax.MoRegConfig(frames=2)))
    run_steps(forced, make_inputs, 1)
    assert forced.program().rewrite.frame_layout == (1, 2)


def test_moreg_on_split_streams_uses_the_video_part():
    model, make_inputs = build("hunyuan_video")  # middle block concatenates [video; text], then splits
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, moreg=ax.MoRegConfig()))
    run_steps(cached, make_inputs, 1)
    assert cached.program().rewrite.frame_layout == (1, 2)
    assert cached.state()["p_prev_0"].shape == (1, 32, 32)  # the 32 video tokens only


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a value: torch.export cannot capture it
            x = x * 2
        for block in self.blocks:
            x = x + block(x)
        return x


def test_capture_failure_names_the_model_and_what_to_do():
    cached = ax.transform(DataDependent(), ax.AdaCacheConfig(num_steps=4))
    with pytest.raises(ax.CaptureError, match="(?s)DataDependent.*What you can do"), torch.no_grad():
        cached(torch.randn(16385, 4))  # larger than an input capture may specialize (SPECIALIZE_MAX_NUMEL)


def test_a_specialized_stream_is_named_in_the_error():
    """A small latent the forward branches on is specialized (a constant): the error says so."""
    cached = ax.transform(DataDependent(), ax.AdaCacheConfig(num_steps=4))
    with pytest.raises(ax.TransformError, match=r"specialized \['arg0'\].*the forward branches on its values"):
        with torch.no_grad():
            cached(torch.randn(2, 4))


def test_runs_with_grad_enabled_and_returns_no_graph():
    model, make_inputs = build("stdit")
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4))
    out = cached(**make_inputs(0))  # no torch.no_grad() around the call
    with torch.no_grad():
        expected = model(**make_inputs(0))
    assert not out.requires_grad
    assert float((out - expected).abs().max()) < 1e-5


def test_too_few_steps_to_skip_is_said_once_naming_the_forced_steps(wan):
    model, _ = wan
    with pytest.warns(UserWarning, match=r"with 4 steps, AdaCacheConfig computes every step .*steps \[1, 2, 3, 4\]"):
        cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached.reset(4)  # said once per N
        ax.transform(model, ax.AdaCacheConfig(num_steps=5))  # steps 3 can be cached
        ax.transform(model, ax.AdaCacheConfig(num_steps=4, codebook=presets.NEVER))  # what was asked for
    with pytest.warns(UserWarning, match=r"with 3 steps, EasyCacheConfig computes every step"):
        ax.transform(model, ax.EasyCacheConfig(num_steps=3))
