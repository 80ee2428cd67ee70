"""The eager twin of a rewritten program (adacache_fx/eager.py): bitwise the graph module's outputs on every
step of a generation, for every fixture family, each granularity, forecasting and bf16; no ``OpOverload``
or ``torch.cond`` left in it; rebuilt after a program hook replaces a branch, a copy or a pickle."""

import copy
import inspect
import io

import pytest
import torch
from helpers import first_tensor, run_steps
from torch.utils._python_dispatch import TorchDispatchMode

import adacache_fx as ax
from adacache_fx.eager import bound, plain_eager, run_cond
from adacache_fx.tools.fixtures import FAMILIES, build

N = 10
COND = torch.ops.higher_order.cond


def fast_config(**fields):
    # thresholds that cache about half of the steps on the fixtures (both branches run)
    return ax.AdaCacheConfig(num_steps=N, codebook={0.5: 4, 1.0: 2, 1e9: 1}, **fields)


def twin_matches_graph_module(cached, make_inputs):
    """Call the graph module and its eager twin on the same inputs and state at every step (the graph is
    pure: the model writes the state back after its own call). Returns the number of cached steps."""
    with torch.no_grad():
        for s in range(N):
            kwargs = make_inputs(s)
            program, state = cached.prepare_call((), kwargs)
            flat = program.captured.flatten_inputs((), kwargs)
            expected = program.graph_module(*flat, *state.values())
            got = program.eager(*flat, *state.values())
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                assert a.dtype == b.dtype and a.shape == b.shape, f"step {s + 1}"
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), f"step {s + 1}"
            cached(**kwargs)
    return N - cached.report().num_computed


@pytest.mark.parametrize("family", FAMILIES)
def test_twin_equals_graph_module_bitwise(family):
    model, make_inputs = build(family)
    cached = ax.transform(model, fast_config())
    assert twin_matches_graph_module(cached, make_inputs) > 0


@pytest.mark.parametrize("granularity", ["stack", "block", "branch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_equals_graph_module_granularities_forecast_bf16(granularity, dtype):
    model, make_inputs = build("cogvideox", dtype=dtype)
    config = fast_config(granularity=granularity, extrapolation_order=1, forecast_gain=0.5)
    cached = ax.transform(model, config)
    assert twin_matches_graph_module(cached, make_inputs) > 0


def test_twin_calls_kernels_directly_and_each_cond_becomes_a_branch_choice():
    model, make_inputs = build("wan")
    cached = ax.transform(model, fast_config(granularity="block"))
    run_steps(cached, make_inputs, 2)
    program = cached.program()
    gm, twin = program.graph_module, program.eager
    conds = [n for n in gm.graph.nodes if n.target is COND]
    assert len(conds) == 4  # one per block
    assert [n.target for n in twin.graph.nodes if n.op == "call_function"].count(run_cond) == len(conds)
    assert len(twin.graph.nodes) == len(gm.graph.nodes)
    for module in [twin, *[m for m in twin.modules() if isinstance(m, torch.fx.GraphModule)]]:
        for node in module.graph.nodes:
            assert node.target is not COND and not isinstance(node.target, torch._ops.OpOverload), node.format_node()
    # every generated module, the branches included, calls the C++ entry points (building a parent
    # regenerates its children's code), which is all that OpOverload.__call__ does
    assert bound(twin)
    assert "return self._op(*args, **kwargs)" in inspect.getsource(torch._ops.OpOverload.__call__)
    # the same parameters, not copies
    params = {id(p) for p in model.parameters()}
    assert {id(p) for p in twin.parameters()} <= params


def test_tracing_and_transforms_use_the_graph_module():
    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert plain_eager()
    with Passthrough():
        assert not plain_eager()
    seen = []
    torch.func.vmap(lambda x: seen.append(plain_eager()) or x)(torch.zeros(2))
    assert seen == [False]


def test_a_deep_copy_rebuilds_its_twin():
    model, make_inputs = build("wan")
    cached = ax.transform(model, fast_config())
    first = run_steps(cached, make_inputs, 3)
    twin = cached.program().eager
    clone = copy.deepcopy(cached)
    clone.reset()
    again = run_steps(clone, make_inputs, 3)
    assert clone.program().eager is not twin and bound(clone.program().eager) and bound(twin)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_a_pickled_model_captures_again_and_continues_the_generation():
    model, make_inputs = build("wan")
    cached = ax.transform(model, fast_config())
    reference = run_steps(cached, make_inputs, N)
    expected_steps = ax.report(cached).computed_steps
    assert 2 < len(expected_steps) < N  # both branches run
    cached.reset()
    run_steps(cached, make_inputs, 4)
    buffer = io.BytesIO()
    torch.save(cached, buffer)  # mid-generation: the state travels, the program is captured again
    buffer.seek(0)
    clone = torch.load(buffer, weights_only=False)
    assert clone.programs == {}  # captured again on its first call
    with pytest.raises(RuntimeError, match="captures its program again"):
        ax.report(clone)
    with torch.no_grad():
        rest = [first_tensor(clone(**make_inputs(s))).clone() for s in range(4, N)]
    assert bound(clone.program().eager)
    assert ax.report(clone).computed_steps == expected_steps
    assert all(torch.equal(a, b) for a, b in zip(reference[4:], rest))


def test_program_hook_rebuilds_the_twin():
    model, make_inputs = build("wan")
    cached = ax.transform(model, fast_config())
    reference = run_steps(cached, make_inputs, N)
    cached.reset()
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, branch):
            super().__init__()
            self.branch = branch

        def forward(self, *operands):
            calls.append(1)
            return self.branch(*operands)

    def wrap_compute_branches(program):
        gm = program.graph_module
        for node in gm.graph.nodes:
            if node.target is COND:
                name = node.args[1].target
                setattr(gm, name, Counting(getattr(gm, name)))

    cached.register_program_hook(wrap_compute_branches)
    with torch.no_grad():
        got = [first_tensor(cached(**make_inputs(s))).clone() for s in range(N)]
    assert len(calls) == cached.report().num_computed > 0
    assert all(torch.equal(a, b) for a, b in zip(got, reference))
