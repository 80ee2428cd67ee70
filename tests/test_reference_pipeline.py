"""The reference pipeline (diffusers conventions) with and without AdaCache, on untrained weights."""

import torch

import adacache_fx as ax
from adacache_fx.tools.fixtures import untrained_reference_pipeline


def run(pipe, steps, **kwargs):
    return pipe(["a small red circle moving left fast", "a large blue square staying still"],
                num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs).frames


def test_outputs_and_transform_with_cfg():
    pipe = untrained_reference_pipeline()
    frames = run(pipe, 4)
    assert frames.shape == (2, 8, 3, 32, 32) and 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
    as_np = run(pipe, 4, output_type="np")
    assert as_np.shape == (2, 8, 32, 32, 3) and as_np.dtype.name == "uint8"
    pipe.transformer = ax.transform(pipe.transformer, ax.AdaCacheConfig(codebook=ax.presets.NEVER))
    assert torch.equal(run(pipe, 4), frames)  # N came from the pipeline's cache_context loop info
    assert ax.report(pipe.transformer, "cond").computed_steps == [1, 2, 3, 4]
    assert ax.report(pipe.transformer, "uncond").computed_steps == [1, 2, 3, 4]


def test_enable_caches_and_follows_num_steps():
    pipe = untrained_reference_pipeline()
    cached = ax.enable(pipe, ax.AdaCacheConfig(codebook={100.0: 4}))
    run(pipe, 10)
    assert ax.report(cached, "cond").computed_steps == [1, 2, 6, 9, 10]
    run(pipe, 12)
    assert ax.report(cached, "uncond").computed_steps == [1, 2, 6, 10, 11, 12]


def test_current_timestep_follows_the_loop_like_diffusers_pipelines():
    pipe = untrained_reference_pipeline()
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda *_: seen.append(float(pipe.current_timestep)))
    run(pipe, 3, guidance_scale=1.0)
    assert seen == [float(t) for t in pipe.scheduler.timesteps] and len(seen) == 3
    assert pipe.current_timestep is None and pipe.num_timesteps == 3 and pipe.guidance_scale == 1.0


def test_each_call_resets_diffusers_stateful_hooks_like_diffusers_pipelines():
    """A diffusers cache hook (TaylorSeer) starts every generation at step 0: the second video of the same
    caption and seed is the first one (without the reset its schedule would continue from step 8)."""
    from diffusers.hooks import TaylorSeerCacheConfig

    pipe = untrained_reference_pipeline()
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=3, max_order=1, cache_identifiers=[r"blocks\.\d+"]))
    first, second = run(pipe, 8), run(pipe, 8)
    pipe.transformer.disable_cache()
    assert torch.equal(first, second)
    assert not torch.equal(first, run(pipe, 8))  # the hook changed the videos
