"""torch.compile(fullgraph=True): one compilation per signature, no graph breaks, equal to eager."""

import pytest
import torch
import torch._dynamo.testing
from helpers import first_tensor

import adacache_fx as ax
from adacache_fx.tools.fixtures import FAMILIES, build


def generation(model, make_inputs, num_steps, contexts=("cond", "uncond")):
    outs = []
    with torch.no_grad():
        for s in range(num_steps):
            for name in contexts:
                with model.cache_context(name) if hasattr(model, "cache_context") else _null():
                    outs.append(first_tensor(model(**make_inputs(s))).clone())
    return outs


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_whole_generation_compiles_once_without_graph_breaks():
    model, make_inputs = build("wan")
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=10, codebook={10.0: 3}))
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(cached, backend=counter, fullgraph=True)
    eager = ax.transform(model, ax.AdaCacheConfig(num_steps=10, codebook={10.0: 3}))
    for _ in range(2):  # two generations, cond and uncond contexts interleaved
        got = generation(compiled, make_inputs, 10)
        expected = generation(eager, make_inputs, 10)
    assert counter.frame_count == 1
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert dict(torch._dynamo.utils.counters["recompiles"]) == {}
    assert ax.report(cached, "cond").computed_steps == [1, 2, 5, 8, 9, 10]
    assert ax.report(cached, "uncond").computed_steps == [1, 2, 5, 8, 9, 10]
    assert max(float((a - b).abs().max()) for a, b in zip(got, expected)) == 0.0


def test_new_signature_compiles_once_more():
    model, make_inputs = build("stdit")
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4))
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(cached, backend=counter, fullgraph=True)
    generation(compiled, make_inputs, 4, contexts=("default",))

    def bigger(step):
        kwargs = make_inputs(step)
        kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"]] * 2, dim=-1)
        return kwargs

    generation(compiled, bigger, 4, contexts=("default",))
    generation(compiled, make_inputs, 4, contexts=("default",))
    assert counter.frame_count == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_equals_eager(family):
    """Compiled with Inductor, both branches exercised: equal to the eager transform (no miscompile)."""
    model, make_inputs = build(family, num_layers=2)
    config = ax.AdaCacheConfig(num_steps=5, compute_steps=(1, 2, 5))
    eager = generation(ax.transform(model, config), make_inputs, 5, contexts=("default",))
    torch._dynamo.reset()
    compiled = torch.compile(ax.transform(model, config), fullgraph=True)
    got = generation(compiled, make_inputs, 5, contexts=("default",))
    assert max(float((a - b).abs().max()) for a, b in zip(got, eager)) < 1e-4


def test_compile_convenience_transforms_and_compiles():
    model, make_inputs = build("stdit", num_layers=2)
    compiled = ax.compile(model, config=ax.AdaCacheConfig(num_steps=4, compute_steps=(1, 3, 4)), backend="inductor")
    eager = ax.transform(model, ax.AdaCacheConfig(num_steps=4, compute_steps=(1, 3, 4)))
    got = generation(compiled, make_inputs, 4, contexts=("default",))
    expected = generation(eager, make_inputs, 4, contexts=("default",))
    assert max(float((a - b).abs().max()) for a, b in zip(got, expected)) < 1e-4
    assert ax.report(compiled).computed_steps == [1, 3, 4]
    with pytest.raises(ValueError, match="backend"):
        ax.compile(model, backend="xla")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_tensorrt_backend_without_gpu_is_a_clear_error():
    model, _ = build("stdit", num_layers=2)
    with pytest.raises(RuntimeError, match="CUDA device"):
        ax.compile(model, backend="tensorrt")


@pytest.mark.parametrize("family,granularity", [("wan", "stack"), ("cogvideox", "block")])
def test_inductor_equals_eager_with_linear_extrapolation(family, granularity):
    model, make_inputs = build(family, num_layers=2)
    config = ax.AdaCacheConfig(num_steps=6, compute_steps=(1, 2, 5), granularity=granularity, extrapolation_order=1)
    eager = generation(ax.transform(model, config), make_inputs, 6, contexts=("default",))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(ax.transform(model, config), backend=counter, fullgraph=True)
    got = generation(compiled, make_inputs, 6, contexts=("default",))
    assert counter.frame_count == 1
    assert max(float((a - b).abs().max()) for a, b in zip(got, eager)) < 1e-4
