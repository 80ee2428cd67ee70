"""A stock diffusers WanPipeline (CFG, cond/uncond contexts) runs with the transformed transformer."""

import copy
import io

import pytest
import torch

import adacache_fx as ax
from adacache_fx.integrations.diffusers import _FOLLOWERS
from adacache_fx.tools.fixtures import tiny_wan_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # WanPipeline's module imports it


def generate(pipe, steps=6, seed=0):
    g = torch.Generator().manual_seed(123)
    prompt, negative = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    return pipe(
        prompt_embeds=prompt, negative_prompt_embeds=negative, height=16, width=16, num_frames=5,
        num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames


def test_wan_pipeline_with_never_skip_equals_untransformed():
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    expected = generate(pipe)
    original = pipe.transformer
    cached = ax.enable(pipe, ax.AdaCacheConfig(codebook=ax.presets.NEVER))
    first = generate(pipe)
    assert torch.equal(first, expected)
    assert ax.report(cached, "cond").num_steps == 6  # N taken from the pipeline call
    assert ax.report(cached, "cond").computed_steps == [1, 2, 3, 4, 5, 6]
    assert ax.report(cached, "uncond").computed_steps == [1, 2, 3, 4, 5, 6]
    ax.disable(pipe)
    assert pipe.transformer is original


def test_wan_pipeline_state_resets_between_calls_and_follows_num_steps():
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    cached = ax.enable(pipe, ax.AdaCacheConfig(codebook={100.0: 3}))
    first = generate(pipe, steps=8)
    assert ax.report(cached, "cond").computed_steps == [1, 2, 5, 7, 8]
    second = generate(pipe, steps=8)
    assert torch.equal(first, second)  # nothing leaked from the first call into the second
    generate(pipe, steps=10)
    rep = ax.report(cached, "uncond")
    assert rep.num_steps == 10 and rep.computed_steps == [1, 2, 5, 8, 9, 10]
    with pytest.raises(ValueError, match="already"):
        ax.enable(pipe)


def test_a_copy_of_an_enabled_transformer_leaves_the_pipeline_behind():
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    cached = ax.enable(pipe, ax.AdaCacheConfig(codebook={100.0: 3}))
    generate(pipe, steps=8)
    clone = copy.deepcopy(cached)
    assert clone not in _FOLLOWERS and len(clone._prepare_hooks) == 0  # the hook was registered copied=False
    assert len(cached._prepare_hooks) == 1  # the original still follows its pipeline
    torch.save(cached, io.BytesIO())  # picklable: the pipeline's scheduler (a local closure) is not taken along
    assert clone.programs == {} and ax.report(cached, "cond").computed_steps == [1, 2, 5, 7, 8]
    generate(pipe, steps=10)  # the pipeline still drives the original only
    assert ax.report(cached, "cond").num_steps == 10


def test_two_pipelines_sharing_one_scheduler_each_follow_their_own_generations():
    """``WanPipeline(**pipe.components)`` shares the scheduler object: each enabled pipeline still gets its
    own N and schedule, and a run of one leaves the other's next run as it would be alone."""
    pipe_a = tiny_wan_pipeline()
    pipe_b = diffusers.WanPipeline(**{**pipe_a.components, "transformer": copy.deepcopy(pipe_a.transformer)})
    alone = tiny_wan_pipeline()
    for pipe in (pipe_a, pipe_b, alone):
        pipe.set_progress_bar_config(disable=True)
    assert pipe_b.scheduler is pipe_a.scheduler
    config = ax.AdaCacheConfig(codebook={100.0: 3})
    cached_a, cached_b, cached_alone = (ax.enable(p, config) for p in (pipe_a, pipe_b, alone))
    expected = generate(alone, steps=8)
    first = generate(pipe_a, steps=8)
    generate(pipe_b, steps=10)
    assert ax.report(cached_b, "cond").num_steps == 10
    assert ax.report(cached_b, "cond").computed_steps == [1, 2, 5, 8, 9, 10]
    second = generate(pipe_a, steps=8)
    for cached in (cached_a, cached_alone):
        assert ax.report(cached, "cond").num_steps == 8
        assert ax.report(cached, "cond").computed_steps == [1, 2, 5, 7, 8]
    assert torch.equal(first, expected) and torch.equal(second, expected)
