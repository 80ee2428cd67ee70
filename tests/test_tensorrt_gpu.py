"""The TensorRT paths on a real GPU (marker ``gpu``: skipped without CUDA, and without the packages).

TF32 is off (in PyTorch, in the TensorRT builder and in Torch-TensorRT) so float32 is compared
tightly; each test checks that engines really replaced the compute branches (a no-op hook fails), that
the computed steps equal PyTorch's, and covers several regions (block granularity), linear
extrapolation, and float16/bfloat16. Not yet run: no GPU has been lent to this project.
"""

import copy

import pytest
import torch
from helpers import first_tensor

import adacache_fx as ax
from adacache_fx.backends import TensorRTBranch, cond_nodes
from adacache_fx.tools.fixtures import build

pytestmark = pytest.mark.gpu
STEPS = 30
TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}
CASES = {  # name: (family, dtype, config kwargs)
    "wan": ("wan", torch.float32, {}),
    "wan-extrapolated": ("wan", torch.float32, {"extrapolation_order": 1}),
    "wan-block": ("wan", torch.float32, {"granularity": "block"}),
    "cogvideox-block": ("cogvideox", torch.float32, {"granularity": "block"}),
    "wan-fp16": ("wan", torch.float16, {}),
    "wan-bf16": ("wan", torch.bfloat16, {}),
}


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _case(name):
    family, dtype, kwargs = CASES[name]
    model, make_inputs = build(family, num_layers=2, dtype=dtype)
    config = ax.AdaCacheConfig(num_steps=STEPS, codebook=ax.presets.FAST_30, **kwargs)

    def cuda_inputs(step):
        return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make_inputs(step).items()}

    return model.cuda(), cuda_inputs, config, dtype


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _generation(model, inputs):
    with torch.no_grad():
        return [first_tensor(model(**inputs(s))).clone() for s in range(STEPS)]


@pytest.mark.parametrize("name", list(CASES))
def test_compile_backend_runs_engines_and_equals_eager(name):
    torch_tensorrt = pytest.importorskip("torch_tensorrt")
    model, inputs, config, dtype = _case(name)
    eager = ax.transform(copy.deepcopy(model), config)
    expected = _generation(eager, inputs)
    compiled = ax.compile(model, backend="tensorrt", config=config, disable_tf32=True)
    got = _generation(compiled, inputs)
    computed = ax.report(eager).computed_steps
    assert ax.report(compiled).computed_steps == computed
    assert 4 <= len(computed) <= STEPS - 6  # both branches ran
    (program,) = compiled.programs.values()
    gm = program.graph_module
    branches = [getattr(gm, true_fn.target) for _, _, true_fn, _, _ in cond_nodes(gm)]
    assert len(branches) == len(ax.report(compiled).regions) >= (2 if "block" in name else 1)
    for branch in branches:  # an engine per region, launched on the computed steps only
        assert isinstance(branch, TensorRTBranch) and branch.calls == len(computed)
        assert branch.engine is not None and branch.engine is not branch.branch
        # torch_tensorrt.compile returns a GraphModule whose submodules are the TensorRT engines
        engines = [m for m in branch.engine.modules() if type(m).__module__.startswith(torch_tensorrt.__name__)]
        assert engines, f"no TensorRT engine in the compiled branch: {branch.engine}"
    assert max(_rel(a, b) for a, b in zip(got, expected)) < TOLERANCE[dtype]


@pytest.mark.parametrize("name", ["wan", "wan-extrapolated", "cogvideox-block", "wan-fp16"])
def test_onnx_engine_equals_torch(name, tmp_path):
    tensorrt = pytest.importorskip("tensorrt")
    from adacache_fx.export import TensorRTRunner, build_tensorrt_engine, to_onnx

    model, inputs, config, dtype = _case(name)
    cached = ax.transform(model, config)
    info = to_onnx(cached, inputs(0), tmp_path / "model.onnx", target="tensorrt")
    assert info.num_if_nodes == info.num_regions
    engine = build_tensorrt_engine(info.path, tmp_path / "model.engine", fp16=dtype == torch.float16, tf32=False)
    runner = TensorRTRunner(engine)
    ax.reset(cached, num_steps=STEPS)
    with torch.no_grad():
        for s in range(STEPS):
            got, expected = runner(**inputs(s))[0], cached(**inputs(s))[0]
            assert _rel(got, expected) < TOLERANCE[dtype], f"step {s + 1} (TensorRT {tensorrt.__version__})"
    assert runner.report().computed_steps == ax.report(cached).computed_steps
    assert 4 <= runner.report().num_computed <= STEPS - 6


def test_onnx_engine_cached_steps_skip_the_blocks(tmp_path):
    """A cached step of the engine takes well under a full one (the If's untaken branch is not run)."""
    pytest.importorskip("tensorrt")
    from adacache_fx.export import TensorRTRunner, build_tensorrt_engine, to_onnx

    family, dtype, _ = CASES["wan"]
    model, make_inputs = build(family, num_layers=8, dtype=dtype)
    model = model.cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make_inputs(0).items()}
    times = {}
    for name, steps in (("full", tuple(range(1, STEPS + 1))), ("cached", (1, STEPS - 1, STEPS))):
        cached = ax.transform(model, ax.AdaCacheConfig(num_steps=STEPS, compute_steps=steps))
        info = to_onnx(cached, inputs, tmp_path / f"{name}.onnx", target="tensorrt")
        runner = TensorRTRunner(build_tensorrt_engine(info.path, tmp_path / f"{name}.engine", tf32=False))
        for _ in range(2):  # warm-up generation, then the timed one
            runner.reset()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.no_grad():
                runner(**inputs)
                start.record()
                for _ in range(STEPS - 4):  # steps 2..N-3: computed in "full", cached in "cached"
                    runner(**inputs)
                end.record()
            torch.cuda.synchronize()
        times[name] = start.elapsed_time(end)
    assert times["cached"] < 0.5 * times["full"], times
