"""Image-to-video and conditioned diffusers pipelines driven through ``adacache_fx.enable``.

Tiny random components (``adacache_fx.tools.fixtures``), prompt embeddings passed directly, latents out. Per
pipeline: never-skip output identical to the pipeline, the default config computes fewer than N steps in each
cache context, a second call identical to the first, MoReg measuring motion. Each pipeline is built once and
its components shared by a plain, a never-skip, a default-config and a MoReg pipeline.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

import adacache_fx as ax
from adacache_fx.tools import fixtures

pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # the pipelines' modules import it

STEPS = 8

#: name: (builder, its arguments, the cache contexts of one call, N per context, MoReg's config)
CASES = {
    "wan_i2v": (fixtures.tiny_wan_i2v_pipeline, {}, ["cond", "uncond"], STEPS, ax.MoRegConfig()),
    "wan_vace": (fixtures.tiny_wan_vace_pipeline, {}, ["cond", "uncond"], STEPS, ax.MoRegConfig()),
    "cogvideox_i2v": (fixtures.tiny_cogvideox_i2v_pipeline, {}, ["cond_uncond"], STEPS, ax.MoRegConfig()),
    # LTX packs tokens with a linear layer: MoReg is told the 3 latent frames (the first is the image's)
    "ltx_i2v": (fixtures.tiny_ltx_conditioned_pipeline, {}, ["cond_uncond"], STEPS, ax.MoRegConfig(frames=3)),
    "ltx_condition": (fixtures.tiny_ltx_conditioned_pipeline, {"condition": True}, ["cond_uncond"], STEPS,
                      ax.MoRegConfig(frames=3)),
    # true CFG as two calls a step outside any cache context: the second runs in a context of its own
    "hunyuan_i2v_concat": (fixtures.tiny_hunyuan_i2v_pipeline, {}, ["default", "default#2"], STEPS,
                           ax.MoRegConfig()),
    "hunyuan_i2v_replace": (fixtures.tiny_hunyuan_i2v_pipeline, {"image_condition_type": "token_replace"},
                            ["default", "default#2"], STEPS, ax.MoRegConfig()),
    "skyreels_df": (fixtures.tiny_skyreels_df_pipeline, {}, ["cond", "uncond"], STEPS, ax.MoRegConfig()),
    # asynchronous diffusion forcing: 3 latent frames, each 1 step behind the one before: 8 + 2 iterations
    "skyreels_df_async": (fixtures.tiny_skyreels_df_pipeline, {"ar_step": 1}, ["cond", "uncond"], STEPS + 2,
                          ax.MoRegConfig()),
}
CONFIGS = {"plain": None, "never": ax.AdaCacheConfig(codebook=ax.presets.NEVER), "default": ax.AdaCacheConfig()}


class Case:
    """One pipeline's components in a plain, a never-skip, a default-config and a MoReg pipeline."""

    def __init__(self, name):
        builder, kwargs, self.contexts, self.n, moreg = CASES[name]
        pipe, self.inputs = builder(**kwargs)
        self.pipes = {"plain": pipe}
        for variant, config in {**CONFIGS, "moreg": ax.AdaCacheConfig(moreg=moreg)}.items():
            if variant != "plain":
                scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # a scheduler each
                self.pipes[variant] = type(pipe)(**{**pipe.components, "scheduler": scheduler})
                self.pipes[variant].set_progress_bar_config(disable=True)
                ax.enable(self.pipes[variant], config)

    def run(self, variant, steps=STEPS, **overrides):
        with torch.no_grad():
            out = self.pipes[variant](num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                                      output_type="latent", **{**self.inputs, **overrides})
        return out.frames.clone()

    def computed(self, variant):
        reports = ax.report(self.pipes[variant])
        assert list(reports) == ["transformer"] and list(reports["transformer"]) == self.contexts
        for rep in reports["transformer"].values():
            assert rep.num_steps == self.n
        return {c: rep.computed_steps for c, rep in reports["transformer"].items()}


@functools.cache
def case(name) -> Case:
    return Case(name)


@pytest.mark.parametrize("name", list(CASES))
def test_never_skip_equals_pipeline_and_default_caches(name):
    c = case(name)
    expected = c.run("plain")
    assert torch.equal(c.run("never"), expected)
    assert c.computed("never") == {context: list(range(1, c.n + 1)) for context in c.contexts}

    first = c.run("default")
    computed = c.computed("default")
    for steps in computed.values():
        assert steps[0] == 1 and steps[-2:] == [c.n - 1, c.n] and len(steps) < c.n
    assert not torch.equal(first, expected)  # the skipped steps changed the output
    assert torch.equal(c.run("default"), first)  # a second call: the same output, the same schedules
    assert c.computed("default") == computed


@pytest.mark.parametrize("name", list(CASES))
def test_moreg_measures_motion_on_the_latent_frames(name):
    c = case(name)
    c.run("moreg")
    for context, rep in ax.report(c.pipes["moreg"])["transformer"].items():
        assert rep.num_steps == c.n
        motion = [r["motion"] for r in rep.steps if r.computed and r.step > 1]
        assert motion and all(m is not None and math.isfinite(m) and m > 0 for m in motion), (context, motion)


def test_calls_outside_any_context_get_a_context_each_within_a_step():
    c = case("hunyuan_i2v_concat")
    c.run("default")
    cached = c.pipes["default"].transformer
    assert cached.generation_contexts == ["default", "default#2"]
    assert cached.active_context == "default"  # the scheduler's step gave the pipeline's context back
    cond, uncond = (cached.state(context) for context in ("default", "default#2"))
    assert not torch.equal(cond["cache_0_0"], uncond["cache_0_0"])  # the halves cache their own residuals


def test_n_is_the_pipeline_loop_length_not_the_scheduler_timesteps():
    c = case("skyreels_df_async")
    calls = []
    handle = c.pipes["plain"].transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    c.run("plain")
    handle.remove()
    assert len(calls) == 2 * (STEPS + 2) and len(c.pipes["plain"].scheduler.timesteps) == STEPS
    c.run("never")
    assert c.computed("never") == {context: list(range(1, STEPS + 3)) for context in c.contexts}


def test_ltx_condition_denoise_strength_gives_n_the_steps_it_runs():
    c = case("ltx_condition")
    expected = c.run("plain", denoise_strength=0.5)
    assert torch.equal(c.run("never", denoise_strength=0.5), expected)
    rep = ax.report(c.pipes["never"].transformer, "cond_uncond")
    assert rep.num_steps == STEPS // 2 and rep.computed_steps == [1, 2, 3, 4]


def test_a_copy_of_the_scheduler_steps_itself():
    pipe = case("skyreels_df").pipes["default"]
    original = pipe.scheduler
    original.set_timesteps(8)
    twin = copy.deepcopy(original)
    twin.set_timesteps(4)
    assert len(twin.timesteps) == 4 and len(original.timesteps) == 8
    assert type(vars(twin)["step"]).__name__ == "SchedulerHook" and vars(twin)["step"].scheduler is twin
