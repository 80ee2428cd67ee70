"""adacache_fx.compile(backend="tensorrt") on CPU, against the stand-in torch_tensorrt (tests/standins):
every region's compute branch is replaced by an engine typed from its operands, the schedule and
outputs equal eager, options reach torch_tensorrt.compile, one hook per model."""

import pytest
import torch
from helpers import first_tensor
from standins.fixtures import cuda_available
from standins.torch_tensorrt import Engine

import adacache_fx as ax
from adacache_fx.backends import TensorRTBranch, cond_nodes
from adacache_fx.tools.fixtures import build

STEPS = 6
CASES = {  # name: (family, config kwargs)
    "wan": ("wan", {}),
    "wan-extrapolated": ("wan", {"extrapolation_order": 1}),
    "wan-block": ("wan", {"granularity": "block"}),
    "cogvideox-block": ("cogvideox", {"granularity": "block"}),
}


def _config(**kwargs):
    return ax.AdaCacheConfig(num_steps=STEPS, compute_steps=(1, 2, 4, 5, 6), **kwargs)


def _generation(model, make_inputs):
    with torch.no_grad():
        return [first_tensor(model(**make_inputs(s))).clone() for s in range(STEPS)]


def _branches(cached) -> list[TensorRTBranch]:
    (program,) = cached.programs.values()
    gm = program.graph_module
    return [getattr(gm, true_fn.target) for _, _, true_fn, _, _ in cond_nodes(gm)]


@pytest.mark.parametrize("name", list(CASES))
def test_every_region_runs_an_engine_typed_from_its_operands(name, fake_torch_tensorrt):
    family, kwargs = CASES[name]
    model, make_inputs = build(family, num_layers=2)
    expected = _generation(ax.transform(model, _config(**kwargs)), make_inputs)
    with cuda_available():
        compiled = ax.compile(model, backend="tensorrt", config=_config(**kwargs))
    got = _generation(compiled, make_inputs)
    branches = _branches(compiled)
    assert len(branches) == len(ax.report(compiled).regions) == len(fake_torch_tensorrt.compiled)
    assert len(branches) >= (2 if kwargs.get("granularity") == "block" else 1)
    for branch in branches:  # replaced, built once, launched on the computed steps only
        assert isinstance(branch, TensorRTBranch) and isinstance(branch.engine, Engine)
        assert branch.engine.calls == branch.calls == 5
    assert [m for m, _, _ in fake_torch_tensorrt.compiled] == [b.branch for b in branches]  # the original branches
    for _, inputs, options in fake_torch_tensorrt.compiled:
        assert options == {"min_block_size": 1}
        assert all(i.dtype in (torch.float32, torch.bool, torch.int64, torch.int32) for i in inputs)
    assert ax.report(compiled).computed_steps == [1, 2, 4, 5, 6]
    assert max(float((a - b).abs().max()) for a, b in zip(got, expected)) == 0.0


def test_options_reach_torch_tensorrt(fake_torch_tensorrt):
    model, make_inputs = build("wan", num_layers=2)
    with cuda_available():
        compiled = ax.compile(model, backend="tensorrt", config=_config(), min_block_size=3, workspace_size=1 << 20)
        with pytest.raises(ValueError, match=r"enabled_precisions.*model.half\(\)"):
            ax.compile(model, backend="tensorrt", config=_config(), enabled_precisions={torch.half})
    _generation(compiled, make_inputs)
    assert [options for _, _, options in fake_torch_tensorrt.compiled] == [
        {"min_block_size": 3, "workspace_size": 1 << 20}
    ]


def test_hook_reaches_programs_captured_before_compile(fake_torch_tensorrt):
    model, make_inputs = build("wan", num_layers=2)
    cached = ax.transform(model, _config())
    expected = _generation(cached, make_inputs)  # captured and run in PyTorch first
    ax.reset(cached)
    with cuda_available():
        assert ax.compile(cached, backend="tensorrt") is cached
    got = _generation(cached, make_inputs)
    assert [b.engine.calls for b in _branches(cached)] == [5]
    assert max(float((a - b).abs().max()) for a, b in zip(got, expected)) == 0.0


def test_second_compile_does_not_stack_a_hook(fake_torch_tensorrt):
    model, make_inputs = build("wan", num_layers=2)
    cached = ax.transform(model, _config())
    with cuda_available():
        ax.compile(cached, backend="tensorrt")
        ax.compile(cached, backend="tensorrt", min_block_size=1)  # the same options: nothing more
        with pytest.raises(ValueError, match="already compiled with TensorRT options"):
            ax.compile(cached, backend="tensorrt", min_block_size=2)
    _generation(cached, make_inputs)
    (branch,) = _branches(cached)
    assert isinstance(branch.branch, torch.fx.GraphModule)  # one wrapper around the original branch
    assert len(fake_torch_tensorrt.compiled) == 1 and branch.engine.calls == 5


def test_compile_refuses_a_new_config_for_a_transformed_model(fake_torch_tensorrt):
    model, _ = build("wan", num_layers=2)
    cached = ax.transform(model, _config())
    for backend in ("inductor", "tensorrt"):
        with cuda_available(), pytest.raises(ValueError, match="already transformed with a different config"):
            ax.compile(cached, backend=backend, config=_config(extrapolation_order=1))
    assert ax.compile(cached, backend="inductor", config=_config()) is not None  # the same config is fine
