"""MagCache's rule in the graph: a plain-Python reference of the published rule, parity with diffusers'
own MagCache on the same model and ratios, every granularity, cache contexts, reset, compiled, ONNX, bf16."""


import numpy as np
import pytest
import torch
from helpers import assert_compiled_and_exported, hand_reference, max_diff, run_steps

import adacache_fx as ax
from adacache_fx.policies import MagCachePolicy
from adacache_fx.tools.fixtures import build, tiny_dit

# a MagCache-like profile (Flux's published ratios, 28 steps): large ratios first, below 1 at the end
PROFILE = (1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344,
           0.98047, 1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047, 0.98828,
           0.96484, 0.95703, 0.93359, 0.89062)
RATIOS_12 = (1.0, 1.05, 1.02, 1.01, 1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.9, 0.85)
f32 = np.float32


def reference_schedule(ratios, num_steps, threshold, max_skip, retention_ratio=0.2, warmup_steps=0):
    """diffusers' MagCache decisions (``MagCacheHeadHook.new_forward``) for one cache context, plain Python;
    its accumulators are float32 (its ratios are a float32 tensor), its threshold a float32 comparison."""
    n, length = num_steps, len(ratios)
    if length != n:  # diffusers' nearest_interp: round(i * (L - 1) / (N - 1)) in float32, half to even
        scale = f32((length - 1) / (n - 1)) if n > 1 else None
        ratios = [ratios[-1]] if n == 1 else [ratios[int(np.round(f32(i) * scale))] for i in range(n)]
    ratios = [f32(r) for r in ratios]
    retention = int(retention_ratio * n + 0.5)
    acc_ratio, acc_err, acc_steps = f32(1.0), f32(0.0), 0
    computed = []
    for i in range(n):
        compute = True
        if i >= retention and i + 1 > warmup_steps:
            acc_ratio = f32(acc_ratio * ratios[i])
            acc_steps += 1
            acc_err = f32(acc_err + abs(f32(1.0) - acc_ratio))
            if computed and acc_err <= f32(threshold) and acc_steps <= max_skip:
                compute = False
            else:
                acc_ratio, acc_err, acc_steps = f32(1.0), f32(0.0), 0
        if compute:
            computed.append(i + 1)
    return computed


def policy_schedule(config, num_steps, generations=1):
    """The policy's decisions, its tensor code called directly (no model)."""
    policy = MagCachePolicy(config)
    state = {spec.name: torch.full(spec.shape, spec.fill, dtype=spec.dtype) for spec in policy.state_specs()}
    step, n = torch.tensor(0), torch.tensor(num_steps)
    computed = []
    for _ in range(num_steps * generations):
        s, compute, state = policy.decide(step, n, state)
        state, _ = policy.update(s, compute, [], state, n)  # no metric site
        step = s
        computed += [int(s)] if bool(compute) else []
    return computed


# -- (a) the schedule is the published rule ----------------------------------------------------------
def test_schedule_equals_the_reference_over_thresholds_and_k():
    rng = np.random.default_rng(0)
    noisy = tuple(1.0 + 0.08 * rng.standard_normal(30))
    checked = 0
    for ratios in (PROFILE, noisy):
        for n in (8, 28, 50):
            for threshold in (0.0, 0.03, 0.06, 0.12, 0.2, 0.5, 10.0):
                for k in (0, 1, 2, 3, 5):
                    for retention, warmup in ((0.2, 0), (0.0, 0), (0.5, 0), (0.0, 4)):
                        config = ax.MagCacheConfig(mag_ratios=ratios, threshold=threshold, max_skip_steps=k,
                                                   retention_ratio=retention, warmup_steps=warmup)
                        got = policy_schedule(config, n, generations=2 if n == 8 else 1)
                        expected = reference_schedule(ratios, n, threshold, k, retention, warmup)
                        assert got == expected * (2 if n == 8 else 1), (ratios[1], n, threshold, k, retention)
                        checked += 1
    assert checked == 2 * 3 * 7 * 5 * 4
    # the sweep is not vacuous: schedules from every step to the K cap
    assert reference_schedule(PROFILE, 28, 10.0, 3) == [1, 2, 3, 4, 5, 6, 10, 14, 18, 22, 26]
    assert reference_schedule(PROFILE, 28, 0.06, 3) == [1, 2, 3, 4, 5, 6, 8, 10, 14, 18, 22, 25, 27, 28]
    # err <= threshold (not <): with threshold 0 the steps whose ratio is exactly 1 still skip
    assert reference_schedule(PROFILE, 28, 0.0, 3) == [*range(1, 15), 16, 18, *range(21, 29)]
    assert reference_schedule(noisy, 30, 0.0, 3) == list(range(1, 31))  # no ratio exactly 1: nothing skips


def test_ratio_resampling_and_retention_match_diffusers():
    from diffusers.hooks.mag_cache import nearest_interp

    for length in (5, 10, 28, 31, 50):
        ratios = torch.linspace(0.8, 1.2, length)
        policy = MagCachePolicy(ax.MagCacheConfig(mag_ratios=ratios.tolist()), 1)
        for n in (1, 2, 3, 7, 10, 28, 30, 50, 97):
            expected = nearest_interp(ratios, n) if n != length else ratios
            got = torch.stack([policy.ratio_at(torch.tensor(i), torch.tensor(n)) for i in range(n)])
            assert torch.equal(got, expected), (length, n)
    for retention in (0.1, 0.2, 0.25, 0.3, 1 / 3):
        policy = MagCachePolicy(ax.MagCacheConfig(mag_ratios=(1.0,), retention_ratio=retention))
        for n in (*range(1, 200), 1024, 1025, 2000):
            assert int(policy.retention_steps(torch.tensor(n))) == int(retention * n + 0.5), (retention, n)


def test_config_validates_and_round_trips():
    import json

    from adacache_fx.config import config_from_dict

    config = ax.MagCacheConfig(num_steps=12, mag_ratios=list(RATIOS_12), threshold=0.1, max_skip_steps=2,
                               granularity="block", extrapolation_order=2)
    assert config.mag_ratios == RATIOS_12
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="needs mag_ratios"):
        ax.MagCacheConfig()
    with pytest.raises(ValueError, match="max_skip_steps"):
        ax.MagCacheConfig(mag_ratios=(1.0,), max_skip_steps=-1)


@pytest.mark.parametrize("granularity", ["stack", "block", "branch"])
def test_model_schedule_and_outputs_equal_the_references(granularity):
    model, make_inputs = build("wan")
    config = ax.MagCacheConfig(num_steps=12, mag_ratios=RATIOS_12, threshold=0.1, max_skip_steps=3,
                               granularity=granularity)
    cached = ax.transform(model, config)
    got = run_steps(cached, make_inputs, 12)
    report = ax.report(cached)
    expected_steps = reference_schedule(RATIOS_12, 12, 0.1, 3)
    assert report.computed_steps == expected_steps == [1, 2, 6, 9, 11, 12]
    # history: (computed, err, ratio, skipped-run length) as the accumulators stood
    assert [round(r["err"], 4) for r in report.steps[2:6]] == [0.02, 0.0502, 0.0804, 0.1003]
    assert [r["steps"] for r in report.steps[2:6]] == [1, 2, 3, 4]
    # the cached steps add the residual of the last compute step, as the hand-written reference does
    assert max_diff(got, hand_reference(model, make_inputs, 12, expected_steps, granularity)) < 1e-5
    # the rule reads no metric: no metric site, no kept metric residual (only the cached residuals)
    assert report.metric_sites == [] and not any(n.startswith("p_prev") for n in cached.program().layout.names)
    never = ax.transform(model, ax.AdaCacheConfig(num_steps=12, granularity=granularity))
    run_steps(never, make_inputs, 1)
    assert report.cache_bytes < ax.report(never).cache_bytes


def test_cache_contexts_keep_their_own_accumulators_and_reset_restarts():
    model, make_inputs = tiny_dit()
    cached = ax.transform(model, ax.MagCacheConfig(num_steps=12, mag_ratios=RATIOS_12, threshold=0.1))
    expected = reference_schedule(RATIOS_12, 12, 0.1, 3)
    with torch.no_grad():
        for s in range(12):  # CFG: "cond" and "uncond" calls interleaved, "uncond" with other inputs
            with cached.cache_context("cond"):
                cached(**make_inputs(s))
            with cached.cache_context("uncond"):
                cached(**dict(make_inputs(s), encoder_hidden_states=-make_inputs(s)["encoder_hidden_states"]))
    assert ax.report(cached, "cond").computed_steps == expected
    assert ax.report(cached, "uncond").computed_steps == expected
    report = ax.report(cached, "cond")  # the report names MagCache's accumulators, not AdaCache's columns
    assert report.columns == ("err", "ratio", "steps")
    assert str(report).splitlines()[1].split() == ["step", "computed", "err", "ratio", "steps"]
    assert [r["steps"] for r in report.steps][:2] == [0, 0]  # the retention window (2 of 12 steps) counts nothing
    run_steps(cached, make_inputs, 5)  # an interrupted generation in the default context
    ax.reset(cached)
    first = run_steps(cached, make_inputs, 12)
    assert ax.report(cached).computed_steps == expected
    second = run_steps(cached, make_inputs, 12)  # a new generation starts after step N by itself
    assert ax.report(cached).computed_steps == expected
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# -- (b) parity with diffusers' own MagCache ----------------------------------------------------------
class CaptionedWan:
    """The tiny stock WanPipeline called like ReferencePipeline: ``pipe(prompt, num_inference_steps,
    generator)``, the caption seeding its prompt embeddings (it has no text encoder); latents out."""

    def __init__(self, pipe):
        self.__dict__["pipe"] = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __setattr__(self, name, value):
        setattr(self.pipe, name, value)

    def __call__(self, prompt, num_inference_steps, generator=None, guidance_scale=5.0):
        embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(len(prompt)))
        generator = generator or torch.Generator().manual_seed(0)
        return self.pipe(prompt_embeds=embeds, negative_prompt_embeds=0.5 * embeds, height=16, width=16,
                         num_frames=5, num_inference_steps=num_inference_steps, generator=generator,
                         guidance_scale=guidance_scale, output_type="latent").frames


def _diffusers_mag_cache(pipe, config, steps):
    """Run diffusers' MagCache; return the latents and the computed steps per context (the middle block's
    attention runs only on a computed step, the block's hooked forward is called on every step;
    WanPipeline calls "cond" then "uncond" at each step)."""
    transformer = pipe.transformer
    calls, ran = [0], []
    handles = [transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)),
               transformer.blocks[len(transformer.blocks) // 2].attn1.to_q.register_forward_hook(
                   lambda *_: ran.append(calls[0] - 1))]
    transformer.enable_cache(config)
    try:
        latents = pipe("a caption", steps, torch.Generator().manual_seed(0))
    finally:
        pipe.maybe_free_model_hooks()
        transformer.disable_cache()
        for handle in handles:
            handle.remove()
    assert calls[0] == 2 * steps
    return latents, {name: [k // 2 + 1 for k in ran if k % 2 == j] for j, name in enumerate(("cond", "uncond"))}


def test_parity_with_diffusers_mag_cache():
    from diffusers.hooks import MagCacheConfig as DiffusersMagCacheConfig

    from adacache_fx.tools.fixtures import tiny_wan_pipeline

    steps = 12
    pipe = CaptionedWan(tiny_wan_pipeline())
    pipe.set_progress_bar_config(disable=True)
    uncached = pipe("a caption", steps, torch.Generator().manual_seed(0))
    # our calibration equals diffusers' calibration mode (it prints one list per context)
    ratios = ax.calibrate_magnitudes(pipe, ["a caption"], steps)
    import contextlib
    import io
    import json

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _diffusers_mag_cache(pipe, DiffusersMagCacheConfig(calibrate=True, num_inference_steps=steps), steps)
    lines = printed.getvalue().splitlines()
    lists = [json.loads(line) for line in lines if line.startswith("[") and line.endswith("]")]
    assert len(lists) == 2 and len(ratios) == steps
    np.testing.assert_allclose(ratios, np.mean(lists, axis=0), rtol=1e-5)
    assert max(abs(r - 1) for r in ratios[1:]) > 0.01  # a profile, not all ones

    results = []
    # this random model's ratios stay within 2% of 1: thresholds of a few percent span the schedules
    for threshold, k, retention in ((0.01, 3, 0.2), (0.015, 2, 0.2), (0.02, 2, 0.0), (0.03, 3, 0.2), (0.06, 5, 0.0)):
        theirs, their_steps = _diffusers_mag_cache(pipe, DiffusersMagCacheConfig(
            threshold=threshold, max_skip_steps=k, retention_ratio=retention, num_inference_steps=steps,
            mag_ratios=ratios), steps)
        cached = ax.enable(pipe, ax.MagCacheConfig(mag_ratios=ratios, threshold=threshold, max_skip_steps=k,
                                                   retention_ratio=retention))
        try:
            ours = pipe("a caption", steps, torch.Generator().manual_seed(0))
            our_steps = {c: ax.report(cached, c).computed_steps for c in ("cond", "uncond")}
        finally:
            ax.disable(pipe)
        assert our_steps == their_steps, (threshold, k)
        assert our_steps["cond"] == reference_schedule(ratios, steps, threshold, k, retention)
        assert float((ours - theirs).abs().max()) < 1e-4 * float(theirs.abs().max()), (threshold, k)
        results.append((threshold, k, len(our_steps["cond"]), float((ours - theirs).abs().max()),
                        float((ours - uncached).abs().max())))
    print("\nMagCache parity (threshold, K, computed of 12 per context, max |ours - diffusers'|, "
          "max |ours - uncached|):", results)
    computed = [r[2] for r in results]
    assert computed == sorted(set(computed), reverse=True) and computed[0] < steps  # five different schedules
    assert results[-1][4] > 1e-3  # the cached run differs from the uncached one: the parity is not vacuous


# -- (c) compiled, 0 graph breaks; ONNX with If nodes --------------------------------------------------
def test_compiled_fullgraph_and_onnx_schedules_equal_eager(tmp_path):
    model, make_inputs = tiny_dit()
    config = ax.MagCacheConfig(num_steps=12, mag_ratios=RATIOS_12, threshold=0.1, granularity="block")
    cached = ax.transform(model, config)
    eager = run_steps(cached, make_inputs, 12)
    expected = ax.report(cached).computed_steps
    assert expected == reference_schedule(RATIOS_12, 12, 0.1, 3)

    assert_compiled_and_exported(cached, make_inputs, 12, eager, expected, tmp_path / "magcache.onnx", if_nodes=4)


# -- (d) bf16 ---------------------------------------------------------------------------------------
def test_bf16_decides_in_float32():
    model, make_inputs = build("wan", dtype=torch.bfloat16)
    cached = ax.transform(model, ax.MagCacheConfig(num_steps=12, mag_ratios=RATIOS_12, threshold=0.1))
    outs = run_steps(cached, make_inputs, 12)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in outs)
    state = cached.state()
    assert state["history"].dtype == state["mag_err"].dtype == state["mag_ratio"].dtype == torch.float32
    expected = reference_schedule(RATIOS_12, 12, 0.1, 3)
    assert ax.report(cached).computed_steps == expected
    assert max_diff(outs, hand_reference(model, make_inputs, 12, expected, "stack")) <= 2**-6
