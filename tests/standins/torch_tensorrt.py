"""A stand-in for ``torch_tensorrt`` (2.13's ``compile(ir="dynamo")`` surface): compiling records the
module and its typed inputs and returns an "engine" that runs the module in PyTorch, checking that
each call matches the inputs it was built for."""

from __future__ import annotations

import importlib.machinery
import types

import torch
from torch import nn

#: Keyword options of ``torch_tensorrt.compile(ir="dynamo")`` this stand-in accepts: a subset of the
#: parameters of 2.13's ``torch_tensorrt.dynamo.compile``. Others are a TypeError here, stricter than 2.13,
#: which drops unknown keywords (``enabled_precisions``, gone from its signature, included) silently.
OPTIONS = {"min_block_size", "workspace_size", "disable_tf32", "optimization_level", "device", "truncate_double",
           "torch_executed_ops", "use_python_runtime", "use_fp32_acc", "require_full_compilation"}


class Input:
    def __init__(self, shape=None, dtype=None, **kwargs):
        if shape is None or dtype is None or not isinstance(dtype, torch.dtype):
            raise ValueError(f"stand-in torch_tensorrt.Input needs a shape and a torch dtype, got {shape}, {dtype}")
        self.shape, self.dtype = tuple(int(d) for d in shape), dtype


class Engine(nn.Module):
    """What ``compile`` returns: the module run in PyTorch, for the inputs it was built for only."""

    def __init__(self, module: nn.Module, inputs: list[Input]):
        super().__init__()
        self.module, self.inputs, self.calls = module, inputs, 0

    def forward(self, *args):
        got = [(tuple(a.shape), a.dtype) for a in args]
        built = [(i.shape, i.dtype) for i in self.inputs]
        if got != built:
            raise RuntimeError(f"stand-in engine built for {built}, called with {got}")
        self.calls += 1
        out = self.module(*args)
        return list(out) if isinstance(out, (tuple, list)) else out  # Torch-TensorRT returns lists


def make_module() -> types.ModuleType:
    """A fresh ``torch_tensorrt`` module; ``module.compiled`` lists ``(module, inputs, options)``."""
    module = types.ModuleType("torch_tensorrt")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_tensorrt", None)  # torch._dynamo looks it up
    module.__version__ = "2.13.0+standin"
    module.compiled = []
    module.Input = Input

    def compile(model, ir="default", inputs=None, **options):  # noqa: A001
        if ir != "dynamo":
            raise ValueError(f"stand-in supports ir='dynamo' only, got {ir!r}")
        unknown = set(options) - OPTIONS
        if unknown:
            raise TypeError(f"stand-in torch_tensorrt.compile: unknown options {sorted(unknown)}")
        if not inputs or not all(isinstance(i, Input) for i in inputs):
            raise ValueError("stand-in torch_tensorrt.compile needs typed inputs")
        engine = Engine(model, list(inputs))
        module.compiled.append((model, list(inputs), dict(options)))
        return engine

    module.compile = compile
    return module
