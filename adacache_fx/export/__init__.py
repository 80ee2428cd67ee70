"""Export a transformed model with its AdaCache state as explicit inputs and outputs, and run it.

    info = adacache_fx.export.to_onnx(cached, make_inputs(0), "model.onnx")
    runner = adacache_fx.export.OnnxRunner("model.onnx")
    sample = runner(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

Each cached region is an ONNX ``If`` node (a TensorRT conditional), so a cached step skips the block
stack in ONNX Runtime and TensorRT as in torch. Files are specialized to the example's shapes.
"""

from .onnx import ExportInfo, read_metadata, to_onnx
from .runner import OnnxRunner, StatefulRunner
from .tensorrt import TensorRTRunner, build_tensorrt_engine
from .validate import ExportValidationError, validate

__all__ = [
    "ExportInfo",
    "ExportValidationError",
    "OnnxRunner",
    "StatefulRunner",
    "TensorRTRunner",
    "build_tensorrt_engine",
    "read_metadata",
    "to_onnx",
    "validate",
]
