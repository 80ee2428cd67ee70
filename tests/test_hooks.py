"""diffusers' and accelerate's hooks: layerwise casting is captured as the model computes, model CPU offload
runs around the cached call, group and sequential offloading are named errors."""

from __future__ import annotations

import pytest
import torch
from helpers import counted_compile

import adacache_fx as ax
from adacache_fx.tools.fixtures import build, tiny_wan_pipeline

pytest.importorskip("diffusers")

N = 10


def generation(model, make_inputs):
    with torch.no_grad():
        return torch.stack([model(**make_inputs(step))[0] for step in range(N)])


@pytest.mark.parametrize("storage, compute", [(torch.float8_e4m3fn, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float8_e4m3fn, torch.bfloat16)])
def test_layerwise_casting_is_exact_and_keeps_the_stored_dtype(storage, compute):
    model, make_inputs = build("wan", num_layers=2, dtype=compute)
    model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    stored = {name: p.dtype for name, p in model.named_parameters()}
    assert stored["blocks.0.attn1.to_q.weight"] == storage
    expected = generation(model, make_inputs)
    never = ax.transform(model, ax.AdaCacheConfig(num_steps=N, codebook=ax.presets.NEVER))
    assert float((generation(never, make_inputs) - expected).abs().max()) == 0.0
    assert {name: p.dtype for name, p in model.named_parameters()} == stored  # still stored low precision
    program = next(iter(never.programs.values()))
    assert storage in {p.dtype for p in program.graph_module.parameters()}  # the graph casts the stored weights
    default = ax.transform(model, ax.AdaCacheConfig(num_steps=N))
    got = generation(default, make_inputs)
    steps = ax.report(default).computed_steps
    assert steps[-2:] == [N - 1, N] and len(steps) < N
    assert all(torch.equal(got[s - 1], expected[s - 1]) for s in steps)


def test_layerwise_casting_compiles_as_one_graph_without_breaks():
    model, make_inputs = build("wan", num_layers=2)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    config = ax.AdaCacheConfig(num_steps=N, codebook={10.0: 3})
    eager = generation(ax.transform(model, config), make_inputs)
    cached = ax.transform(model, config)
    compiled, counter = counted_compile(cached)
    got = generation(compiled, make_inputs)
    assert counter.frame_count == 1 and dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert float((got - eager).abs().max()) == 0.0 and len(ax.report(cached).computed_steps) < N


def test_layerwise_casting_enabled_after_transform_is_captured_again():
    model, make_inputs = build("wan", num_layers=2)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=N, codebook=ax.presets.NEVER))
    generation(cached, make_inputs)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    expected = generation(model, make_inputs)
    assert float((generation(cached, make_inputs) - expected).abs().max()) == 0.0 and cached.captures == 2


def test_group_offloading_is_a_named_error():
    model, make_inputs = build("wan", num_layers=2)
    model.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(ax.CaptureError, match="GroupOffloadingHook .*What you can do"):
        generation(ax.transform(model, ax.AdaCacheConfig(num_steps=N)), make_inputs)


def _pipeline_call(pipe, steps=6):
    g = torch.Generator().manual_seed(123)
    return pipe(prompt_embeds=torch.randn(1, 8, 32, generator=g), negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
                height=16, width=16, num_frames=5, num_inference_steps=steps, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="latent").frames


@pytest.mark.parametrize("offload_first", [True, False])
def test_model_cpu_offload_runs_its_hook_around_the_cached_call(offload_first, monkeypatch):
    pytest.importorskip("transformers")
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    expected = _pipeline_call(pipe)
    onloads = []
    original = accelerate_hooks.CpuOffload.pre_forward

    def spy(self, module, *args, **kwargs):
        onloads.append(type(module).__name__)
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(accelerate_hooks.CpuOffload, "pre_forward", spy)
    if offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
    cached = ax.enable(pipe, ax.AdaCacheConfig(codebook=ax.presets.NEVER))
    if not offload_first:
        pipe.enable_model_cpu_offload(device="cpu")  # the hook goes on the original transformer
    assert type(pipe.transformer._hf_hook).__name__ == "CpuOffload" and "_hf_hook" not in vars(cached)
    for _ in range(2):
        onloads.clear()
        assert torch.equal(_pipeline_call(pipe), expected)
        assert onloads.count("WanTransformer3DModel") == 12  # every call (6 steps x 2 halves) runs the hook
    assert cached.captures == 1
    ax.disable(pipe)


def test_sequential_cpu_offload_is_a_named_error():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_sequential_cpu_offload(device="cpu")
    ax.enable(pipe)
    with pytest.raises(ax.CaptureError, match="accelerate's .*enable_sequential_cpu_offload.*enable_model_cpu_offload"):
        _pipeline_call(pipe)
