"""Dynamic shapes exported: one ONNX file from ``transform(..., dynamic_shapes=...)`` serves every size in
ONNX Runtime (a state per size), and a TensorRT engine takes an optimization profile (min/opt/max) for
the same axes, the state's ranges derived from it (through the TensorRT stand-in, tests/standins)."""

import copy

import pytest
import torch
from helpers import first_tensor
from standins.fixtures import cuda_available
from test_dynamic_shapes import SIZES, STEPS, WAN_DIMS, config, run, sized_inputs

import adacache_fx as ax
from adacache_fx.export import OnnxRunner, TensorRTRunner, build_tensorrt_engine, to_onnx
from adacache_fx.export.tensorrt import optimization_profile
from adacache_fx.tools.fixtures import build

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(dynamic transform, make_inputs, plain file, TensorRT-profiled file)``, exported at 2 frames x 8x8."""
    folder = tmp_path_factory.mktemp("dynamic")
    model, make_inputs = build("wan", num_layers=2)
    dynamic = ax.transform(copy.deepcopy(model), config(), dynamic_shapes=WAN_DIMS)
    example = sized_inputs(make_inputs, 2, 8)(0)
    to_onnx(dynamic, example, folder / "wan.onnx")
    to_onnx(dynamic, example, folder / "wan_trt.onnx", target="tensorrt")
    return dynamic, make_inputs, folder / "wan.onnx", folder / "wan_trt.onnx"


def generate(runner, make, context):
    with runner.cache_context(context, num_steps=STEPS):
        return [first_tensor(runner(**make(s))).clone() for s in range(STEPS)]


def test_one_onnx_file_serves_every_size(exported):
    dynamic, make_inputs, path, _ = exported
    runner = OnnxRunner(path)
    for frames, size in SIZES:
        make, name = sized_inputs(make_inputs, frames, size), f"{frames}x{size}"
        got, expected = generate(runner, make, name), run(dynamic, make, name)
        assert max(float((x - y).abs().max()) for x, y in zip(got, expected)) < 1e-4
        assert runner.report(name).computed_steps == ax.report(dynamic, name).computed_steps
        assert runner.report(name).num_computed < STEPS
        assert runner.state(name)["cache_0_0"].shape == (1, frames * (size // 2) ** 2, 32)  # a state per size
    assert dynamic._captures == 1
    inputs = sized_inputs(make_inputs, 2, 8)(0)
    with pytest.raises(ValueError, match=r"input 'encoder_hidden_states': expected shape \(1, 8, 16\).*fixed in the file"):
        runner(**{**inputs, "encoder_hidden_states": torch.zeros(1, 9, 16)})


def test_tensorrt_profile_covers_the_inputs_and_the_state(exported, fake_tensorrt, tmp_path):
    dynamic, make_inputs, _, path = exported
    trt = fake_tensorrt("10.16.0")
    ranges = ((1, 4, 2, 8, 8), (1, 4, 2, 12, 12), (1, 4, 3, 12, 12))
    with cuda_available():
        with pytest.raises(ValueError, match=r"this file has dynamic axes.*hidden_states"):
            build_tensorrt_engine(path, tmp_path / "none.engine")
        with pytest.raises(ValueError, match=r"dim 1 is fixed to 4"):
            build_tensorrt_engine(path, tmp_path / "bad.engine", shapes={"hidden_states": ((1, 3, 2, 8, 8),) * 3})
        engine = build_tensorrt_engine(path, tmp_path / "wan.engine", shapes={"hidden_states": ranges})
        runner = TensorRTRunner(engine, device="cpu")
    profile = trt.built[-1]["profiles"][0]
    assert profile["hidden_states"] == list(ranges)
    # tokens = frames x (h / 2) x (w / 2) at min, opt and max
    assert profile["state.cache_0_0"] == [(1, 32, 32), (1, 72, 32), (1, 108, 32)]
    assert profile["state.history"][0][0] == 3
    for frames, size in [(2, 8), (3, 12)]:
        make, name = sized_inputs(make_inputs, frames, size), f"trt-{frames}x{size}"
        got, expected = generate(runner, make, name), run(dynamic, make, name)
        assert max(float((x - y).abs().max()) for x, y in zip(got, expected)) < 1e-4
        assert runner.report(name).computed_steps == ax.report(dynamic, name).computed_steps
    with pytest.raises(ValueError, match="TensorRT rejected the shape"):
        runner(**sized_inputs(make_inputs, 3, 16)(0))  # 16x16 is outside the profile
    assert any("outside the profile" in e for e in trt.errors)


def test_a_static_file_needs_no_profile_and_takes_none():
    from adacache_fx.state import StateLayout, StateSpec

    history = StateSpec("history", None, torch.float32, float("nan"), columns=("computed",))
    metadata = {"num_steps": STEPS, "inputs": [{"name": "x", "kind": "tensor", "shape": [1, 4]}],
                "state": StateLayout((history,)).to_dict()}
    assert optimization_profile(metadata) == {"state.history": ((3, 2), (STEPS, 2), (1000, 2))}
    with pytest.raises(ValueError, match="whose shapes are fixed in this file"):
        optimization_profile(metadata, {"x": ((1, 4),) * 3})
    with pytest.raises(ValueError, match=r"not tensor inputs of this file \(\['x'\]\)"):
        optimization_profile(metadata, {"y": ((1, 4),) * 3})


def test_reference_model_one_capture_compiled_once_one_file(tmp_path):
    """The bundled reference model (4x4 patches) with dynamic frames, height and width: one
    capture equals the static transform at 2 frame counts x 2 resolutions, one compiled graph and one
    ONNX file serve them all, with the same computed steps."""
    from helpers import counted_compile
    from torch.export import Dim

    from adacache_fx.tools import reference as ref

    model, encoder = ref.load_reference_model()
    steps = 10
    text = encoder.encode_conditioning(["a red circle moving left fast"])

    def sized(frames, size):
        def make(step):
            x = torch.randn(1, 3, frames, size, size, generator=torch.Generator().manual_seed(frames * 100 + size))
            return {"hidden_states": x + 0.02 * step, "timestep": torch.tensor([1000.0 * (1 - step / steps)]),
                    **text, "return_dict": False}
        return make

    dims = {"hidden_states": {2: Dim("frames", max=16), 3: 4 * Dim("h", max=16), 4: 4 * Dim("w", max=16)}}
    dynamic = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(num_steps=steps), dynamic_shapes=dims)
    static = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(num_steps=steps))
    compiled, counter = counted_compile(dynamic)
    to_onnx(dynamic, sized(8, 32)(0), tmp_path / "reference.onnx")
    runner = OnnxRunner(tmp_path / "reference.onnx")

    def generation(model, make, context):
        with torch.no_grad(), model.cache_context(context, num_steps=steps):
            return [first_tensor(model(**make(s))).clone() for s in range(steps)]

    skipped = 0
    for frames, size in [(8, 32), (4, 16), (8, 16), (4, 32)]:
        make, name = sized(frames, size), f"{frames}x{size}"
        eager = generation(dynamic, make, name)
        for other, context, tol in ((static, name, 0.0), (compiled, name + "-compiled", 1e-5),
                                    (runner, name, 1e-4)):
            got = generation(other, make, context)
            assert max(float((x - y).abs().max()) for x, y in zip(got, eager)) <= tol, (name, context)
            report = other.report(context) if other is runner else ax.report(dynamic if other is compiled else other, context)
            assert report.computed_steps == ax.report(dynamic, name).computed_steps
        skipped += steps - ax.report(dynamic, name).num_computed
    assert skipped > 0
    assert counter.frame_count == 1 and dynamic._captures == 1
