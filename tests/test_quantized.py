"""torchao-quantized weights (``quantize_``): never-skip exact, the default policy caches, int8 weight-only
compiles as one graph."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from helpers import counted_compile

import adacache_fx as ax
from adacache_fx.tools.fixtures import build

pytest.importorskip("diffusers")
quantization = pytest.importorskip("torchao.quantization")

N = 12
CONFIGS = {
    "int8_weight_only": lambda: quantization.Int8WeightOnlyConfig(),
    "float8_weight_only": lambda: quantization.Float8WeightOnlyConfig(),
    "int8_dynamic_int8_weight": lambda: quantization.Int8DynamicActivationInt8WeightConfig(),
}


def quantized_wan(name, dtype):
    model, make_inputs = build("wan", num_layers=2, dtype=dtype)
    weight = model.blocks[0].attn1.to_q.weight
    quantization.quantize_(model, CONFIGS[name]())
    assert type(model.blocks[0].attn1.to_q.weight) is not type(weight)  # a torchao tensor subclass now
    return model, make_inputs


def generation(model, make_inputs):
    with torch.no_grad():
        return torch.stack([model(**make_inputs(step))[0] for step in range(N)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_never_skip_is_exact_and_default_caches(name, dtype):
    model, make_inputs = quantized_wan(name, dtype)
    expected = generation(model, make_inputs)
    never = ax.transform(model, ax.AdaCacheConfig(num_steps=N, codebook=ax.presets.NEVER))
    assert float((generation(never, make_inputs) - expected).abs().max()) == 0.0
    assert ax.report(never).computed_steps == list(range(1, N + 1))

    default = ax.transform(model, ax.AdaCacheConfig(num_steps=N))
    got = generation(default, make_inputs)
    steps = ax.report(default).computed_steps
    assert steps[0] == 1 and steps[-2:] == [N - 1, N] and len(steps) < N
    for step in steps:  # a compute step is the model's own output
        assert torch.equal(got[step - 1], expected[step - 1])


def test_int8_weight_only_compiles_as_one_graph_without_breaks():
    model, make_inputs = quantized_wan("int8_weight_only", torch.float32)
    config = ax.AdaCacheConfig(num_steps=N, codebook={10.0: 3})
    eager = generation(ax.transform(model, config), make_inputs)
    cached = ax.transform(model, config)
    compiled, counter = counted_compile(cached)
    got = generation(compiled, make_inputs)
    assert counter.frame_count == 1
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert len(ax.report(cached).computed_steps) < N
    assert float((got - eager).abs().max()) == 0.0


def test_quantizing_after_transform_is_captured_again(caplog):
    import logging

    model, make_inputs = build("wan", num_layers=2)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=N, codebook=ax.presets.NEVER))
    generation(cached, make_inputs)
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())  # replaces the weights the program holds
    expected = generation(model, make_inputs)
    with caplog.at_level(logging.INFO, logger="adacache_fx"):
        got = generation(cached, make_inputs)
    assert float((got - expected).abs().max()) == 0.0 and cached.captures == 2
    assert any("weights changed" in r.message and "capturing again" in r.message for r in caplog.records)
    generation(cached, make_inputs)
    assert cached.captures == 2
