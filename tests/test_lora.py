"""peft adapters changed after transform: the programs are captured again, the outputs stay the model's."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo.testing

import adacache_fx as ax
from adacache_fx.tools.fixtures import build

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

N = 6
NEVER = ax.AdaCacheConfig(num_steps=N, codebook=ax.presets.NEVER)


def lora_wan(dtype=torch.float32):
    model, make_inputs = build("wan", num_layers=2, dtype=dtype)
    torch.manual_seed(1)  # init_lora_weights=False: random A and B, so an adapter changes the output
    config = dict(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    model.add_adapter(peft.LoraConfig(**config), adapter_name="a")
    model.add_adapter(peft.LoraConfig(lora_alpha=8, **config), adapter_name="b")
    model.set_adapters("a")
    return model.to(dtype), make_inputs


def generation(model, make_inputs):
    with torch.no_grad():
        return [model(**make_inputs(step))[0].clone() for step in range(N)]


def _scale(model):
    from diffusers.utils.peft_utils import scale_lora_layers

    scale_lora_layers(model, 0.5)


#: (what the user does, on the wrapped model) in order; each one changes the output
CHANGES = [
    ("set_adapters(['a', 'b'], weights)", lambda m: m.set_adapters(["a", "b"], weights=[1.0, 0.5])),
    ("set_adapters('b')", lambda m: m.set_adapters("b")),
    ("scale_layer (scale_lora_layers 0.5)", _scale),
    ("disable_adapters", lambda m: m.disable_adapters()),
    ("enable_adapters", lambda m: m.enable_adapters()),
    ("fuse_lora", lambda m: m.fuse_lora()),
    ("unfuse_lora", lambda m: m.unfuse_lora()),
    ("delete_adapters('b')", lambda m: m.delete_adapters("b")),  # 'b' was active: peft activates 'a'
    ("unload_lora", lambda m: m.unload_lora()),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_adapter_change_is_captured_again_and_exact(dtype, caplog):
    model, make_inputs = lora_wan(dtype)
    cached = ax.transform(model, NEVER)
    previous = generation(model, make_inputs)
    assert torch.equal(torch.stack(generation(cached, make_inputs)), torch.stack(previous))
    assert cached.captures == 1
    generation(cached, make_inputs)
    assert cached.captures == 1  # nothing changed: no capture
    for count, (what, change) in enumerate(CHANGES, start=2):
        change(cached)  # through the wrapper, as a pipeline does (pipe.transformer.set_adapters(...))
        expected = generation(model, make_inputs)
        if what != "fuse_lora":  # fusing keeps the output up to rounding
            assert not torch.equal(torch.stack(expected), torch.stack(previous)), what
        with caplog.at_level(logging.INFO, logger="adacache_fx"):
            caplog.clear()
            got = generation(cached, make_inputs)
        assert torch.equal(torch.stack(got), torch.stack(expected)), what
        assert cached.captures == count, what
        assert [r.message for r in caplog.records if "peft adapters" in r.message and "capturing again" in r.message]
        previous = expected
    assert ax.report(cached).computed_steps == list(range(1, N + 1))


def test_default_policy_after_a_change_equals_a_fresh_transform():
    model, make_inputs = lora_wan()
    config = ax.AdaCacheConfig(num_steps=N, codebook={100.0: 2})
    cached = ax.transform(model, config)
    generation(cached, make_inputs)
    model.set_adapters(["a", "b"], weights=[1.0, 0.7])  # on the model itself: the wrapper sees it too
    got = generation(cached, make_inputs)
    fresh = ax.transform(model, config)
    assert torch.equal(torch.stack(got), torch.stack(generation(fresh, make_inputs)))
    assert ax.report(cached).computed_steps == ax.report(fresh).computed_steps
    assert len(ax.report(cached).computed_steps) < N


def test_a_change_in_the_middle_of_a_generation_goes_on_with_the_same_state():
    model, make_inputs = lora_wan()
    config = ax.AdaCacheConfig(num_steps=N, codebook={100.0: 2})
    cached, reference = ax.transform(model, config), ax.transform(model, config)
    with torch.no_grad():
        for step in range(N):
            if step == 3:
                model.set_adapters("b")
            inputs = make_inputs(step)
            got = cached(**inputs)[0]
            if step == 3:  # the reference captures again too, from its next call on
                assert cached.captures == 2
            expected = reference(**inputs)[0]
            assert torch.equal(got, expected), step
    assert ax.report(cached).computed_steps == ax.report(reference).computed_steps
    assert len(ax.report(cached).steps) == N  # one generation of N steps: the state was kept across the capture


def test_under_torch_compile_a_change_is_one_more_graph():
    model, make_inputs = lora_wan()
    cached = ax.transform(model, NEVER)
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(cached, backend=counter, fullgraph=True)
    assert torch.equal(torch.stack(generation(compiled, make_inputs)), torch.stack(generation(model, make_inputs)))
    assert counter.frame_count == 1
    cached.set_adapters(["a", "b"], weights=[1.0, 0.5])
    assert torch.equal(torch.stack(generation(compiled, make_inputs)), torch.stack(generation(model, make_inputs)))
    assert counter.frame_count == 2 and cached.captures == 2
    generation(compiled, make_inputs)
    assert counter.frame_count == 2
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}


def test_pipeline_lora_methods_act_on_the_original_transformers():
    """diffusers' pipeline LoRA methods skip components that are not ModelMixin: enable() hands them the
    original denoisers, and the cached ones capture again (two experts, LoRA loaded into `transformer`)."""
    import copy

    from diffusers import WanPipeline

    from adacache_fx.tools.fixtures import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(boundary_ratio=0.875)
    donor = copy.deepcopy(pipe.transformer)
    torch.manual_seed(3)
    donor.add_adapter(peft.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False), "x")
    lora = {f"transformer.{k}": v for k, v in peft.get_peft_model_state_dict(donor, adapter_name="x").items()}
    plain = WanPipeline(**pipe.components, boundary_ratio=0.875)  # the same transformers, never transformed
    for p in (pipe, plain):
        p.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(123)
    call = dict(prompt_embeds=torch.randn(1, 8, 32, generator=g), negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
                height=16, width=16, num_frames=5, num_inference_steps=8, guidance_scale=5.0, output_type="latent")

    def outputs():
        return [p(generator=torch.Generator().manual_seed(0), **call).frames for p in (pipe, plain)]

    cached = ax.enable(pipe, ax.AdaCacheConfig(codebook=ax.presets.NEVER))
    got, base = outputs()
    assert torch.equal(got, base)
    steps = [
        lambda: pipe.load_lora_weights(dict(lora), adapter_name="x"),
        lambda: pipe.set_adapters("x", 0.5),
        lambda: pipe.disable_lora(),
        lambda: pipe.enable_lora(),
        lambda: pipe.fuse_lora(),
        lambda: (pipe.unfuse_lora(), pipe.unload_lora_weights()),  # two changes between calls: one capture
    ]
    for count, step in enumerate(steps, start=2):
        step()
        assert isinstance(pipe.transformer, ax.CachedModel)
        got, expected = outputs()
        assert torch.equal(got, expected), count
        assert cached.captures == count
    assert pipe.get_list_adapters() == {}
    ax.disable(pipe)
    assert "set_adapters" not in vars(pipe)
