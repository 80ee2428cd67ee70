"""A stand-in for the ``tensorrt`` Python bindings, emulating 10.x (with ``BuilderFlag.FP16``) or 11.x
(without: strong typing only) for the calls ``adacache_fx.export.tensorrt`` makes.

Building records what was asked (flags, memory pool, optimization profile, the ONNX file) and the
"engine" runs that ONNX file with ONNX Runtime on CPU tensors bound by address, as TensorRT binds
CUDA tensors. Strict like TensorRT: a missing enum member is an AttributeError, the emulated parser
refuses what onnx-tensorrt of that version refuses, ``set_tensor_address`` returns False for an unknown
name or an unaligned address (and such a tensor makes execution fail), and executing with another
device current than the one the engine was deserialized on fails.
"""

from __future__ import annotations

import enum
import importlib.machinery
import json
import types

import onnx
import torch

#: The address alignment the stand-in demands. TensorRT demands 256 bytes of CUDA addresses (the CUDA
#: caching allocator gives 512); PyTorch's CPU allocator gives 64, so the stand-in checks 64.
ALIGNMENT = 64

_ONNX_TO_TRT = {1: "FLOAT", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "HALF", 16: "BF16"}


class Device:
    """The emulated current CUDA device, set by the stand-in ``torch.cuda.device``."""

    current = torch.device("cuda", 0)

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        self.previous, Device.current = Device.current, self.device
        return self

    def __exit__(self, *exc):
        Device.current = self.previous
        return False


def _walk(graph):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attribute.g)


def make_module(version: str) -> types.ModuleType:
    """A fresh ``tensorrt`` module of ``version``; ``.built`` lists what each build was asked."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo looks it up
    trt.__version__ = version
    major, minor = (int(p) for p in version.split(".")[:2])
    trt.built, trt.errors = [], []
    flags = ["TF32", "REFIT", "STRIP_PLAN"] + (["FP16", "BF16", "INT8"] if major < 11 else [])
    trt.BuilderFlag = enum.Enum("BuilderFlag", flags)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", ["EXPLICIT_BATCH", "STRONGLY_TYPED"] if major < 11 else ["STRONGLY_TYPED"],
        start=0)
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    trt.DataType = enum.Enum("DataType", sorted(set(_ONNX_TO_TRT.values())))

    class Logger:
        WARNING = 2

        def __init__(self, severity=2):
            self.severity = severity

    class Network:
        def __init__(self, flags):
            self.flags, self.onnx_path, self.dynamic = flags, None, []

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            model = onnx.load(path, load_external_data=False)
            for graph in _walk(model.graph):
                for node in graph.node:
                    names = [a.name for a in node.attribute]
                    if node.op_type == "ScatterND" and "reduction" in names and (major, minor) < (10, 2):
                        self.errors.append(f"{node.name}: ScatterND: Attribute reduction is not supported")
                    if node.op_type == "Attention" and graph is not model.graph:
                        self.errors.append(f"{node.name}: Attention is not supported inside a conditional")
            self.network.onnx_path = path
            initializers = {i.name for i in model.graph.initializer}
            self.network.dynamic = [v.name for v in model.graph.input if v.name not in initializers and any(
                d.dim_param or not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)]
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's names
            self.shapes[name] = [tuple(min), tuple(opt), tuple(max)]

    class BuilderConfig:
        def __init__(self):
            self.flags, self.cleared, self.pools, self.profiles = [], [], {}, []

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool.name] = int(size)

        def set_flag(self, flag):
            if not isinstance(flag, trt.BuilderFlag):
                raise TypeError(f"set_flag(): incompatible argument {flag!r}")
            self.flags.append(flag.name)

        def clear_flag(self, flag):
            if not isinstance(flag, trt.BuilderFlag):
                raise TypeError(f"clear_flag(): incompatible argument {flag!r}")
            self.cleared.append(flag.name)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            # as TensorRT: every input with a dynamic dimension needs a range in the optimization profile
            profile = config.profiles[0] if config.profiles else {}
            missing = [name for name in network.dynamic if name not in profile]
            if missing:
                trt.errors.append(f"network has dynamic inputs without an optimization profile: {missing}")
                return None
            record = {"onnx": network.onnx_path, "network_flags": network.flags, "flags": config.flags,
                      "cleared": config.cleared,
                      "pools": config.pools, "profiles": config.profiles}
            trt.built.append(record)
            return json.dumps(record).encode()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(json.loads(bytes(data)))

    class Engine:
        def __init__(self, record):
            import onnxruntime as ort

            self.device = Device.current
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self.session = ort.InferenceSession(record["onnx"], sess_options=options,
                                                providers=["CPUExecutionProvider"])
            model = onnx.load(record["onnx"], load_external_data=False)
            initializers = {i.name for i in model.graph.initializer}
            self.inputs = {v.name: v.type.tensor_type for v in model.graph.input if v.name not in initializers}
            self.outputs = {v.name: v.type.tensor_type for v in model.graph.output}
            self.names = [*self.inputs, *self.outputs]
            self.profile = {name: [tuple(shape) for shape in ranges] for name, ranges in record["profiles"][0].items()}

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, index):
            return self.names[index]

        def get_tensor_dtype(self, name):
            kind = {**self.inputs, **self.outputs}[name].elem_type
            return getattr(trt.DataType, _ONNX_TO_TRT[kind])

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.rejected = engine, {}, {}, set()

        def set_input_shape(self, name, shape):
            """False (as TensorRT) for an unknown input, a fixed dim changed, or a size outside the profile."""
            if name not in self.engine.inputs:
                return False
            dims = self.engine.inputs[name].shape.dim
            fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
            if len(shape) != len(fixed) or any(f is not None and f != size for f, size in zip(fixed, shape)):
                return False
            if name in self.engine.profile:
                low, _, high = self.engine.profile[name]
                if any(not lo <= size <= hi for lo, size, hi in zip(low, shape, high)):
                    trt.errors.append(f"set_input_shape({name!r}, {tuple(shape)}) outside the profile {low}..{high}")
                    return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, address):
            if name not in self.engine.names or address % ALIGNMENT:
                trt.errors.append(f"set_tensor_address({name!r}, {address:#x}) rejected")
                self.rejected.add(name)
                return False
            self.rejected.discard(name)
            self.addresses[name] = address
            return True

        def _shape(self, name, tensor_type, dims):
            """An output's shape: its dim_params are input sizes' names, or expressions of them."""
            import sympy

            def size(d):
                if d.HasField("dim_value"):
                    return d.dim_value
                if d.dim_param in dims:
                    return dims[d.dim_param]
                return int(sympy.sympify(d.dim_param).subs({sympy.Symbol(k): v for k, v in dims.items()}))

            return tuple(size(d) for d in tensor_type.shape.dim)

        def execute_async_v3(self, stream_handle):
            import numpy as np

            engine = self.engine
            if Device.current != engine.device:
                trt.errors.append(f"executed with {Device.current} current, engine on {engine.device}")
                return False
            missing = [n for n in engine.names if n not in self.addresses or n in self.rejected]
            if missing:
                trt.errors.append(f"no valid address for {missing}")
                return False
            dims = {}
            for name, tensor_type in engine.inputs.items():
                for d, size in zip(tensor_type.shape.dim, self.shapes[name]):
                    if d.dim_param:
                        dims[d.dim_param] = size
            binding = engine.session.io_binding()
            for bind, tensors in ((binding.bind_input, engine.inputs), (binding.bind_output, engine.outputs)):
                for name, tensor_type in tensors.items():
                    element = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
                    shape = self.shapes[name] if name in engine.inputs else self._shape(name, tensor_type, dims)
                    bind(name, "cpu", 0, np.dtype(element), shape, self.addresses[name])
            engine.session.run_with_iobinding(binding)
            return True

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    return trt
