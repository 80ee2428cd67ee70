"""to_onnx validates the file before returning it (onnx.checker, strict shape inference, an ONNX Runtime
session): a construct no export-preparation pass handles raises an error naming the ONNX op, the torch op,
the module and the source line it came from, and what to do."""

import inspect

import onnxruntime as ort
import pytest
import torch

import adacache_fx as ax
import adacache_fx.export.prepare as prepare_module
from adacache_fx.export import ExportValidationError, to_onnx, validate
from adacache_fx.tools.fixtures import build
from adacache_fx.tools.fixtures.tiny import TinyBlock, tiny_dit


class Quantized(TinyBlock):
    """A block whose output goes through an int16 max: ONNX Runtime's CPU ``Max`` has no int16 kernel."""

    def forward(self, x, text):
        x = super().forward(x, text)
        q = (x * 64).to(torch.int16)
        return torch.maximum(q, torch.zeros_like(q)).to(x.dtype) / 64


def _quantized_model():
    model, make_inputs = tiny_dit()
    torch.manual_seed(0)
    model.blocks = torch.nn.ModuleList(Quantized(32, 2) for _ in range(2)).eval()
    return ax.transform(model, ax.AdaCacheConfig(num_steps=8, granularity="block")), make_inputs


def _line_of(function, text: str) -> int:
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


def test_an_op_ort_cannot_run_names_op_module_line_and_what_to_do(tmp_path):
    cached, make_inputs = _quantized_model()
    with pytest.warns(UserWarning, match="fast path"), pytest.raises(ExportValidationError) as caught:
        to_onnx(cached, make_inputs(0), tmp_path / "quantized.onnx")
    error, origin = caught.value, caught.value.origin
    assert error.stage == "an ONNX Runtime session"
    assert (origin.op_type, origin.torch_op) == ("Max", "aten.maximum.default")
    assert origin.module in ("blocks.0", "blocks.1") and origin.module_class.endswith("Quantized")
    assert origin.location == f"{__file__}:{_line_of(Quantized.forward, 'torch.maximum')} in forward"
    assert origin.code == "return torch.maximum(q, torch.zeros_like(q)).to(x.dtype) / 64"
    message = str(error)
    assert "NOT_IMPLEMENTED" in message and f"module {origin.module} (Quantized)" in message
    assert "What to do: ONNX Runtime's CPUExecutionProvider has no Max" in message


def test_validate_false_skips_only_the_session_which_would_refuse_the_file(tmp_path):
    cached, make_inputs = _quantized_model()
    with pytest.warns(UserWarning, match="fast path"):
        info = to_onnx(cached, make_inputs(0), tmp_path / "quantized.onnx", validate=False)
    assert info.validated == ("onnx.checker", "shape inference (shapes only)")
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    with pytest.raises(ExportValidationError, match="Max node 'node_maximum'"):
        validate(info.path)


def test_an_invalid_translation_is_caught_by_shape_inference(tmp_path, monkeypatch):
    """Without the export-preparation passes PixArt's ``squeeze(1)`` of 16 tokens is an invalid ONNX Squeeze."""
    model, make_inputs = build("pixart", num_layers=2)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=8))
    monkeypatch.setattr(prepare_module, "PIPELINE", ())
    with pytest.raises(ExportValidationError) as caught:
        to_onnx(cached, make_inputs(0), tmp_path / "pixart.onnx")
    error, origin = caught.value, caught.value.origin
    assert error.stage == "shape inference" and "Dimension of input 1 must be 1 instead of 16" in str(error)
    assert (origin.op_type, origin.torch_op, origin.module) == ("Squeeze", "aten.squeeze.dim", "")
    assert origin.location.endswith("in forward") and "pixart_transformer_2d.py" in origin.location
    assert origin.code == "hidden_states = hidden_states.squeeze(1)"
    assert "add an export-preparation pass" in str(error)


def test_bfloat16_is_refused_with_its_op_and_the_dtypes_that_run(tmp_path):
    model, make_inputs = tiny_dit()
    cached = ax.transform(model.to(torch.bfloat16), ax.AdaCacheConfig(num_steps=8))
    inputs = {k: v.to(torch.bfloat16) for k, v in make_inputs(0).items()}
    with pytest.warns(UserWarning, match="fast path"), pytest.raises(ExportValidationError) as caught:
        to_onnx(cached, inputs, tmp_path / "bf16.onnx")
    origin = caught.value.origin
    assert (origin.op_type, origin.torch_op, origin.module) == ("Conv", "aten.conv3d.default", "embed")
    assert "tensor(bfloat16)" in str(caught.value) and "float32 or float16" in str(caught.value)


def test_a_bfloat16_file_for_tensorrt_is_checked_for_shapes_not_schema_types(tmp_path):
    """TensorRT's parser takes a bfloat16 Conv that the ONNX schema (and ONNX Runtime's CPU provider) does not."""
    model, make_inputs = tiny_dit()
    cached = ax.transform(model.to(torch.bfloat16), ax.AdaCacheConfig(num_steps=8))
    inputs = {k: v.to(torch.bfloat16) for k, v in make_inputs(0).items()}
    with pytest.warns(UserWarning, match="fast path"):
        info = to_onnx(cached, inputs, tmp_path / "bf16.onnx", target="tensorrt")
    assert info.validated == ("onnx.checker", "shape inference (shapes only)")
    with pytest.raises(ExportValidationError, match="fails shape inference at Conv node"):
        validate(info.path)  # the CPU provider's check, typed
