"""The TensorRT export path on CPU: the ``target="tensorrt"`` ONNX profile checked on a real export,
then ``build_tensorrt_engine`` and ``TensorRTRunner`` against stand-ins of TensorRT 10.x and 11.x
(tests/standins/tensorrt.py), whose "engine" runs the ONNX file in ONNX Runtime."""

import json

import onnx
import pytest
import torch
from standins.fixtures import cuda_available

import adacache_fx as ax
from adacache_fx.export import TensorRTRunner, build_tensorrt_engine, to_onnx
from adacache_fx.export.profiles import TENSORRT_MAX_OPSET, default_valued_attributes, walk_graphs
from adacache_fx.tools.fixtures import build

STEPS = 30
CONFIG = ax.AdaCacheConfig(num_steps=STEPS, codebook=ax.presets.FAST_30)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny Wan exported as is and with the TensorRT profile: ``(plain, tensorrt, cached, make_inputs)``."""
    folder = tmp_path_factory.mktemp("trt")
    model, make_inputs = build("wan", num_layers=2)
    cached = ax.transform(model, CONFIG)
    to_onnx(cached, make_inputs(0), folder / "plain.onnx")
    info = to_onnx(cached, make_inputs(0), folder / "wan.onnx", target="tensorrt")
    assert info.profile["default_attributes_dropped"] > 0
    return folder / "plain.onnx", folder / "wan.onnx", cached, make_inputs


def _ops(path):
    model = onnx.load(str(path))
    return model, [(graph is model.graph, node) for graph in walk_graphs(model.graph) for node in graph.node]


def test_tensorrt_profile_in_every_subgraph(exports):
    plain, profiled, _, _ = exports
    model, nodes = _ops(plain)
    scatter = [n for top, n in nodes if not top and n.op_type == "ScatterND"]
    assert scatter and all([a.name for a in n.attribute] == ["reduction"] for n in scatter)  # what 10.0/10.1 refuse
    model, nodes = _ops(profiled)
    onnx.checker.check_model(model)
    assert sum(n.op_type == "If" for top, n in nodes if top) == 1 and any(not top for top, _ in nodes)
    assert default_valued_attributes(model) == []
    assert [n for _, n in nodes if n.op_type == "ScatterND" and n.attribute] == []
    assert not any(n.op_type == "Attention" for _, n in nodes)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [TENSORRT_MAX_OPSET]
    assert json.loads(model.metadata_props[0].value)["target"] == "tensorrt"
    with pytest.raises(ValueError, match="opset <= 20"):
        to_onnx(exports[2], exports[3](0), plain.parent / "x.onnx", target="tensorrt", opset=23)


@pytest.mark.parametrize("version", ["10.1.0", "10.16.0", "11.0.0"])
def test_build_parses_the_profiled_file_on_every_version(version, exports, fake_tensorrt, tmp_path):
    plain, profiled, _, _ = exports
    trt = fake_tensorrt(version)
    with cuda_available():
        build_tensorrt_engine(profiled, tmp_path / "wan.engine")
        build_tensorrt_engine(plain, tmp_path / "plain.engine")  # the builder applies the profile itself
    first, second = trt.built
    assert first["flags"] == [] and first["pools"] == {"WORKSPACE": 4 << 30}
    assert first["profiles"] == [{"state.history": [(3, 4), (STEPS, 4), (1000, 4)]}]
    assert second["onnx"] != str(plain)  # a profiled copy was parsed
    assert not list(plain.parent.glob(".*profiled*")) and (tmp_path / "plain.engine.json").is_file()


def test_fp16_uses_the_flag_where_it_exists(exports, fake_tensorrt, tmp_path):
    _, profiled, _, _ = exports
    trt = fake_tensorrt("10.16.0")
    with cuda_available():
        build_tensorrt_engine(profiled, tmp_path / "wan.engine", fp16=True, tf32=False)
    assert trt.built[0]["flags"] == ["FP16"] and trt.built[0]["cleared"] == ["TF32"]


def test_fp16_on_tensorrt_11_takes_the_precision_from_the_onnx_types(exports, fake_tensorrt, tmp_path):
    _, profiled, _, _ = exports
    trt = fake_tensorrt("11.0.0")
    with cuda_available(), pytest.raises(ValueError, match=r"TensorRT 11.0.0 has no FP16 builder flag.*float16"):
        build_tensorrt_engine(profiled, tmp_path / "wan.engine", fp16=True)
    half = onnx.load(str(profiled))  # the same file declared float16: the types carry the precision
    meta = json.loads(half.metadata_props[0].value)
    for item in meta["inputs"]:
        item["dtype"] = "float16" if item.get("dtype") == "float32" else item.get("dtype")
    half.metadata_props[0].value = json.dumps(meta)
    onnx.save(half, str(tmp_path / "half.onnx"))
    with cuda_available():
        build_tensorrt_engine(tmp_path / "half.onnx", tmp_path / "half.engine", fp16=True)
    assert trt.built[0]["flags"] == []


def _generation(runner, cached, make_inputs, transform=lambda t: t):
    ax.reset(cached, num_steps=STEPS)
    runner.reset()
    with torch.no_grad():
        for s in range(STEPS):
            inputs = {k: transform(v) if isinstance(v, torch.Tensor) else v for k, v in make_inputs(s).items()}
            expected, got = cached(**make_inputs(s))[0], runner(**inputs)[0]
            assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4, f"step {s + 1}"
    assert runner.report().computed_steps == ax.report(cached).computed_steps
    assert 4 <= len(ax.report(cached).computed_steps) <= STEPS - 6


@pytest.mark.parametrize("version", ["10.16.0", "11.0.0"])
def test_runner_makes_its_device_current(version, exports, fake_tensorrt, tmp_path):
    _, profiled, cached, make_inputs = exports
    trt = fake_tensorrt(version)
    with cuda_available():
        engine = build_tensorrt_engine(profiled, tmp_path / "wan.engine")
        runner = TensorRTRunner(engine, device="cpu")  # the stand-in's current device is cuda:0 outside
    _generation(runner, cached, make_inputs)
    assert trt.errors == []


def test_runner_aligns_its_inputs_and_checks_addresses(exports, fake_tensorrt, tmp_path):
    _, profiled, cached, make_inputs = exports
    trt = fake_tensorrt("11.0.0")
    with cuda_available():
        runner = TensorRTRunner(build_tensorrt_engine(profiled, tmp_path / "wan.engine"), device="cpu")

    def unaligned(tensor):  # the same values in a view 4 bytes past an allocation's start
        storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype)
        view = storage[1:].view(tensor.shape)
        view.copy_(tensor)
        assert view.data_ptr() % 16 and view.is_contiguous()
        return view

    _generation(runner, cached, make_inputs, unaligned)
    assert trt.errors == []
    runner.context.set_tensor_address = lambda name, address: False  # e.g. an engine without that tensor
    with pytest.raises(RuntimeError, match="TensorRT rejected the address of"):
        runner(**make_inputs(0))


def test_per_sample_history_rows_get_their_profile(fake_tensorrt, tmp_path):
    """Per-sample decisions: the history is [N, B, columns]; the optimization profile keeps B and columns."""
    model, make_inputs = build("wan", num_layers=2)
    batch = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in make_inputs(0).items()}
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=STEPS, batch_decisions="per_sample"))
    to_onnx(cached, (), tmp_path / "rows.onnx", kwargs=batch, target="tensorrt")
    trt = fake_tensorrt("10.16.0")
    with cuda_available():
        build_tensorrt_engine(tmp_path / "rows.onnx", tmp_path / "rows.engine")
    assert trt.built[0]["profiles"] == [{"state.history": [(3, 2, 4), (STEPS, 2, 4), (1000, 2, 4)]}]
