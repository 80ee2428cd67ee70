"""TensorRT engines from :func:`~adacache_fx.export.to_onnx` files (GPU only).

The ONNX ``If`` nodes become TensorRT conditionals, which evaluate only the branch taken, so a cached
step skips the block stack on the GPU too. ``tensorrt`` is imported lazily: without it, or without a
CUDA device, these raise a RuntimeError that says what is missing.

Works with TensorRT 10.0 to 11.x (the build uses no API outside both; ``BuilderFlag.FP16`` only where
it exists). Verified on CPU against stand-ins of both versions (tests/standins); awaiting a GPU run
(tests/test_tensorrt_gpu.py, ``python -m adacache_fx.tools.gpu_check``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..capture.dynamic import solve_sizes
from ..state import StateLayout, dtype_name
from .onnx import read_metadata
from .profiles import apply_tensorrt_profile
from .runner import StatefulRunner

_INSTALL = "install the GPU extras: pip install adacache-fx[gpu] (tensorrt, onnxruntime-gpu, torch-tensorrt)"
#: Rows of ``state.history`` (the number of steps N) an engine accepts.
MAX_STEPS = 1000
#: The alignment TensorRT requires of I/O tensor addresses, in bytes.
ALIGNMENT = 256


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy of it in a fresh allocation when its address (a view's) is not aligned."""
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone(memory_format=torch.contiguous_format)


def require_tensorrt():
    """Import tensorrt, checking for a CUDA device first; RuntimeError saying what is missing."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"TensorRT needs a CUDA device and torch with CUDA, and none is available; {_INSTALL}")
    try:
        import tensorrt
    except ImportError as error:
        raise RuntimeError(f"the tensorrt package is not installed; {_INSTALL}") from error
    return tensorrt


def _sidecar(engine_path: str | Path) -> Path:
    return Path(f"{engine_path}.json")


def build_tensorrt_engine(
    onnx_path: str | Path, engine_path: str | Path, *, fp16: bool = False, workspace_gb: float = 4, tf32: bool = True,
    shapes: dict[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
) -> Path:
    """Build a serialized TensorRT engine (TensorRT 10.0 to 11.x) from a :func:`to_onnx` file.

    Parses the ONNX file (external data included) into an explicit-batch network, limits the builder
    workspace to ``workspace_gb`` GiB, and gives the rows of ``state.history`` the range 3..``MAX_STEPS``
    (optimal: the export's N) in its optimization profile. A file not exported with ``target="tensorrt"``
    gets the TensorRT profile applied to a temporary copy first.
    Writes the engine and, next to it, ``<engine_path>.json`` with the runner's metadata.

    ``shapes``: for a file with dynamic axes (exported from ``transform(..., dynamic_shapes=...)``), the
    ``(min, opt, max)`` shapes of each input with a dynamic size, as TensorRT's optimization profiles take
    them (``{"hidden_states": ((1, 16, 2, 8, 8), (1, 16, 3, 12, 12), (1, 16, 4, 16, 16))}``); the state
    tensors' ranges follow from them (each state size is an expression of the input sizes).

    ``fp16``: TensorRT 10 sets ``BuilderFlag.FP16`` (FP16 kernels allowed). TensorRT 11 has no such
    flag (strong typing): the precision is the ONNX file's, so export the model in float16 or
    bfloat16 (``model.half()`` before :func:`to_onnx`); ``fp16=True`` on a float32 file is a ValueError.
    ``tf32=False`` clears ``BuilderFlag.TF32`` (on by default in TensorRT): float32 matmuls in full
    precision, for exact comparisons with PyTorch.
    """
    trt = require_tensorrt()
    metadata = read_metadata(onnx_path)
    engine_path = Path(engine_path)
    flags = _precision_flags(trt, metadata, fp16)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # the default since TensorRT 10
    network = builder.create_network(0 if explicit is None else 1 << int(explicit))
    parser = trt.OnnxParser(network, logger)
    with _profiled(onnx_path, metadata, engine_path) as parsed:
        if not parser.parse_from_file(str(parsed)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for flag in flags:
        config.set_flag(flag)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in optimization_profile(metadata, shapes).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    _sidecar(engine_path).write_text(json.dumps(metadata))
    return engine_path


def optimization_profile(metadata: dict, shapes: dict | None = None) -> dict[str, tuple[tuple, tuple, tuple]]:
    """``(min, opt, max)`` of every input of an exported file with a dynamic size: ``state.history``'s rows
    (3..``MAX_STEPS``, optimal N), the user inputs with dynamic axes (from ``shapes``, checked against the
    file) and the state tensors whose sizes are expressions of theirs (evaluated at min, opt and max)."""
    layout = StateLayout.from_dict(metadata["state"])
    n = metadata["num_steps"]
    tail = layout.spec("history").shape_for(1)[1:]  # (B,) C: per-sample rows
    profile = {"state.history": ((3, *tail), (n, *tail), (max(n, MAX_STEPS), *tail))}
    tensors = {item["name"]: item for item in metadata["inputs"] if item["kind"] == "tensor"}
    dynamic = {name: item for name, item in tensors.items() if any(isinstance(d, str) for d in item["shape"])}
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - set(tensors))
    if unknown:
        raise ValueError(f"shapes= names {unknown}, which are not tensor inputs of this file ({sorted(tensors)})")
    static = sorted(set(shapes) - set(dynamic))
    if static:
        raise ValueError(f"shapes= gives ranges for {static}, whose shapes are fixed in this file")
    if set(dynamic) - set(shapes):
        example = {name: "((min...), (opt...), (max...))" for name in dynamic}
        raise ValueError(
            f"this file has dynamic axes: build_tensorrt_engine(..., shapes={example}) needs the range of "
            + ", ".join(f"{name} {tuple(item['shape'])}" for name, item in dynamic.items())
        )
    for name, ranges in shapes.items():
        expected = dynamic[name]["shape"]
        ranges = tuple(tuple(int(d) for d in shape) for shape in ranges)
        if len(ranges) != 3 or any(len(shape) != len(expected) for shape in ranges):
            raise ValueError(f"shapes[{name!r}] must be (min, opt, max), each a shape like {tuple(expected)}")
        for d, (size, low, opt, high) in enumerate(zip(expected, *ranges)):
            if isinstance(size, int) and not low == opt == high == size:
                raise ValueError(f"shapes[{name!r}] dim {d} is fixed to {size} in this file, got {low}, {opt}, {high}")
            if not 1 <= low <= opt <= high:
                raise ValueError(f"shapes[{name!r}] dim {d}: need 1 <= min <= opt <= max, got {low}, {opt}, {high}")
        profile[name] = ranges
    if layout.symbolic:
        at = [solve_sizes((dynamic[name].get("sizes", dynamic[name]["shape"]), profile[name][i]) for name in dynamic)
              for i in range(3)]
        for spec in layout:
            if spec.shape is not None and any(isinstance(d, str) for d in spec.shape):
                profile[f"state.{spec.name}"] = tuple(layout.resolve(sizes).spec(spec.name).shape for sizes in at)
    return profile


def _precision_flags(trt, metadata: dict, fp16: bool) -> list:
    """The builder flags for ``fp16``: the FP16 flag where the installed TensorRT has it (10.x); none
    under strong typing (11.x) if the file is half precision already; else a ValueError saying why."""
    if not fp16:
        return []
    flag = getattr(trt.BuilderFlag, "FP16", None)
    if flag is not None:
        return [flag]
    dtypes = {item["dtype"] for item in metadata["inputs"] if item["kind"] == "tensor" and "float" in item["dtype"]}
    if dtypes and dtypes <= {"float16", "bfloat16"}:
        return []
    raise ValueError(
        f"TensorRT {trt.__version__} has no FP16 builder flag (strongly typed networks): the precision is the "
        f"ONNX file's ({sorted(dtypes)}). Export the model in float16 or bfloat16 (model.half() before to_onnx) "
        "and build it, or build this file with fp16=False"
    )


@contextlib.contextmanager
def _profiled(onnx_path, metadata: dict, engine_path: Path):
    """The path to parse: the file itself if exported with ``target="tensorrt"``, else a profiled copy
    next to it (so its external data files resolve), removed afterwards."""
    if metadata.get("target") == "tensorrt":
        yield Path(onnx_path)
        return
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    apply_tensorrt_profile(model)
    copy = Path(onnx_path).with_name(f".{engine_path.name}.profiled.onnx")
    onnx.save(model, str(copy))
    try:
        yield copy
    finally:
        copy.unlink(missing_ok=True)


class TensorRTRunner(StatefulRunner):
    """Run an engine from :func:`build_tensorrt_engine` with the AdaCache state kept on the GPU.

    Same interface as :class:`~adacache_fx.export.OnnxRunner`: call it like the torch model, ``reset``,
    ``cache_context``, ``report``, ``state``/``load_state``. Inputs, outputs and state are torch CUDA
    tensors bound by address (``set_tensor_address``); each call enqueues ``execute_async_v3`` on
    torch's current stream, so results are ordered with the surrounding torch work.
    """

    def __init__(self, engine_path: str | Path, num_steps: int | None = None, device: int | str | torch.device = 0):
        trt = require_tensorrt()
        sidecar = _sidecar(engine_path)
        if not sidecar.is_file():
            raise FileNotFoundError(f"{sidecar} is missing: build engines with adacache_fx.export.build_tensorrt_engine")
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        super().__init__(json.loads(sidecar.read_text()), device, num_steps)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not deserialize {engine_path} (built by another TensorRT version?)")
            self.context = self.engine.create_execution_context()
        self._check_io(trt)

    def _check_io(self, trt) -> None:
        """The engine's I/O tensors must be the export's, with the dtypes the runner allocates."""
        meta = self.metadata
        expected = {i["name"]: i["dtype"] for i in meta["inputs"] if i["kind"] == "tensor"}
        expected |= {o["name"]: o["dtype"] for o in meta["outputs"]}
        for spec in self.layout:
            expected[f"state.{spec.name}"] = dtype_name(spec.dtype)
            if spec.returned:
                expected[f"state_out.{spec.name}"] = dtype_name(spec.dtype)
        names = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32",
                 "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
        engine = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        problems = sorted(set(expected) ^ engine)
        problems += [
            f"{name}: engine {self.engine.get_tensor_dtype(name)}, expected {dtype}"
            for name, dtype in expected.items()
            if name in engine and self.engine.get_tensor_dtype(name) != getattr(trt.DataType, names[dtype])
        ]
        if problems:
            raise RuntimeError(f"the engine's inputs and outputs do not match its adacache_fx metadata: {problems}")

    def _execute(self, feeds, outputs):
        with torch.cuda.device(self.device):  # the engine's device, whatever the caller's current one
            for name, tensor in feeds.items():
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    raise ValueError(f"TensorRT rejected the shape {tuple(tensor.shape)} of input {name!r}")
            feeds = {name: _aligned(tensor) for name, tensor in feeds.items()}
            for name, tensor in {**feeds, **outputs}.items():
                if not self.context.set_tensor_address(name, tensor.data_ptr()):
                    raise RuntimeError(
                        f"TensorRT rejected the address of {name!r} ({tensor.data_ptr():#x}): not an I/O tensor "
                        f"of this engine, or not {ALIGNMENT}-byte aligned"
                    )
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
