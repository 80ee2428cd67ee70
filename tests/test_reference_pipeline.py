"""The reference pipeline (diffusers conventions) with and without AdaCache, on untrained weights."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import adacache_fx as ax
from adacache_fx.reference import build_reference_model
from adacache_fx.reference.pipeline import ReferencePipeline


def make_pipeline():
    torch.manual_seed(0)
    transformer, caption_encoder = build_reference_model()
    pipe = ReferencePipeline(transformer.eval(), caption_encoder.eval(), FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, steps, **kwargs):
    return pipe(["a small red circle moving left fast", "a large blue square staying still"],
                num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs).frames


def test_outputs_and_transform_with_cfg():
    pipe = make_pipeline()
    frames = run(pipe, 4)
    assert frames.shape == (2, 8, 3, 32, 32) and 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
    as_np = run(pipe, 4, output_type="np")
    assert as_np.shape == (2, 8, 32, 32, 3) and as_np.dtype.name == "uint8"
    pipe.transformer = ax.transform(pipe.transformer, ax.AdaCacheConfig(codebook=ax.presets.NEVER))
    assert torch.equal(run(pipe, 4), frames)  # N came from the pipeline's cache_context loop info
    assert ax.report(pipe.transformer, "cond").computed_steps == [1, 2, 3, 4]
    assert ax.report(pipe.transformer, "uncond").computed_steps == [1, 2, 3, 4]


def test_enable_caches_and_follows_num_steps():
    pipe = make_pipeline()
    cached = ax.enable(pipe, ax.AdaCacheConfig(codebook={100.0: 4}))
    run(pipe, 10)
    assert ax.report(cached, "cond").computed_steps == [1, 2, 6, 9, 10]
    run(pipe, 12)
    assert ax.report(cached, "uncond").computed_steps == [1, 2, 6, 10, 11, 12]
