"""Pipelines with several denoisers (Wan2.2 A14B: ``transformer`` + ``transformer_2`` split at ``boundary_ratio``)
and Wan2.2 TI2V-style ``expand_timesteps``, driven through ``adacache_fx.enable``."""

from __future__ import annotations

import warnings

import pytest
import torch

import adacache_fx as ax
from adacache_fx.integrations.diffusers import _FOLLOWERS
from adacache_fx.tools.fixtures import tiny_wan_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # WanPipeline's module imports it

STEPS = 20


def generate(pipe, steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(123)
    prompt, negative = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    return pipe(
        prompt_embeds=prompt, negative_prompt_embeds=negative, height=16, width=16, num_frames=5,
        num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).frames


def expert_pipe(shift=None, dtype=torch.float32, **kwargs):
    pipe = tiny_wan_pipeline(boundary_ratio=0.875, **kwargs)
    if shift is not None:
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe.transformer.to(dtype)
    pipe.transformer_2.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def calls_per_expert(pipe, steps=STEPS):
    """How many times the uncached pipeline calls each expert (forward pre-hooks), per CFG half."""
    counts = {"transformer": 0, "transformer_2": 0}
    handles = [getattr(pipe, name).register_forward_pre_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
               for name in counts]
    out = generate(pipe, steps)
    for handle in handles:
        handle.remove()
    return {name: count // 2 for name, count in counts.items()}, out


@pytest.mark.parametrize("shift", [None, 3.0])  # shift 7 (the fixture's): 10 + 10 steps; shift 3: 6 + 14
def test_both_experts_cached_with_their_own_steps(shift):
    pipe = expert_pipe(shift)
    expected_n, expected = calls_per_expert(pipe)
    assert sum(expected_n.values()) == STEPS and min(expected_n.values()) >= 3
    originals = (pipe.transformer, pipe.transformer_2)

    never = ax.enable(pipe, ax.AdaCacheConfig(codebook=ax.presets.NEVER))
    assert isinstance(pipe.transformer_2, ax.CachedModel) and pipe.transformer is never
    assert torch.equal(generate(pipe), expected)
    reports = ax.report(pipe)
    assert set(reports) == {"transformer", "transformer_2"}
    for name, by_context in reports.items():
        assert set(by_context) == {"cond", "uncond"}
        for rep in by_context.values():
            assert rep.num_steps == expected_n[name] and rep.computed_steps == list(range(1, expected_n[name] + 1))
    ax.disable(pipe)
    assert (pipe.transformer, pipe.transformer_2) == originals
    assert "set_timesteps" not in vars(pipe.scheduler)

    ax.enable(pipe)
    first = generate(pipe)
    computed = {}
    for name, by_context in ax.report(pipe).items():
        for context, rep in by_context.items():
            n = expected_n[name]
            steps = computed[name, context] = rep.computed_steps
            assert rep.num_steps == n and steps[0] == 1 and steps[-2:] == [n - 1, n] and len(steps) < n
    assert torch.equal(generate(pipe), first)  # a second call: the same output, the same schedules
    assert {(name, c): rep.computed_steps for name, d in ax.report(pipe).items() for c, rep in d.items()} == computed
    assert ax.report(pipe, "cond")["transformer_2"].computed_steps == computed["transformer_2", "cond"]
    assert ax.report(pipe.transformer, "uncond").computed_steps == computed["transformer", "uncond"]
    ax.disable(pipe)


def test_two_experts_in_bf16_never_skip_is_exact():
    pipe = expert_pipe(dtype=torch.bfloat16)
    expected = generate(pipe, steps=12)
    ax.enable(pipe, ax.AdaCacheConfig(codebook=ax.presets.NEVER))
    assert torch.equal(generate(pipe, steps=12), expected)
    ax.disable(pipe)
    ax.enable(pipe)
    generate(pipe, steps=12)
    reports = ax.report(pipe)
    assert sum(rep.num_steps for rep in (reports["transformer"]["cond"], reports["transformer_2"]["cond"])) == 12
    ax.disable(pipe)


def test_an_expert_without_steps_is_left_out_of_the_report():
    pipe = expert_pipe()
    ax.enable(pipe)
    generate(pipe, steps=8)
    assert set(ax.report(pipe)) == {"transformer", "transformer_2"}
    pipe.register_to_config(boundary_ratio=0.0)  # every timestep >= 0: transformer_2 gets no step
    generate(pipe, steps=8)
    reports = ax.report(pipe)
    assert set(reports) == {"transformer"} and reports["transformer"]["cond"].num_steps == 8
    ax.disable(pipe)


def test_several_denoisers_without_a_split_name_them_in_one_warning():
    pipe = tiny_wan_pipeline(boundary_ratio=0.875)
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(boundary_ratio=None)  # WanPipeline then runs `transformer` only
    expected = generate(pipe, steps=8)
    second = pipe.transformer_2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ax.enable(pipe, ax.AdaCacheConfig(codebook=ax.presets.NEVER))
    messages = [str(w.message) for w in caught if "adacache_fx" in str(w.message)]
    assert len(messages) == 1 and "transformer, transformer_2" in messages[0] and "run uncached" in messages[0]
    assert pipe.transformer_2 is second and isinstance(pipe.transformer, ax.CachedModel)
    assert torch.equal(generate(pipe, steps=8), expected)
    assert set(ax.report(pipe)) == {"transformer"}
    ax.disable(pipe)


def test_an_expert_called_more_often_than_its_share_is_named():
    pipe = expert_pipe()
    ax.enable(pipe)
    follower = _FOLLOWERS[pipe.transformer][0]
    follower.num_steps = lambda name=None: 4 if name == "transformer" else 16  # a wrong split (10 + 10 real)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(pipe)
        generate(pipe)
    messages = [str(w.message) for w in caught if "called" in str(w.message)]
    assert len(messages) == 1 and "transformer was called 5 times in cache context 'cond'" in messages[0]
    ax.disable(pipe)


def test_expand_timesteps_one_transformer():
    pipe = tiny_wan_pipeline(expand_timesteps=True)  # Wan2.2 TI2V-5B style: a timestep per token
    pipe.set_progress_bar_config(disable=True)
    expected = generate(pipe, steps=10)
    cached = ax.enable(pipe, ax.AdaCacheConfig(codebook=ax.presets.NEVER))
    assert torch.equal(generate(pipe, steps=10), expected)
    assert ax.report(cached, "cond").computed_steps == list(range(1, 11))
    ax.disable(pipe)
    cached = ax.enable(pipe)
    generate(pipe, steps=10)
    for context in ("cond", "uncond"):
        rep = ax.report(cached, context)
        assert rep.num_steps == 10 and rep.num_computed < 10
    ax.disable(pipe)
