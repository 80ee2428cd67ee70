"""``adacache_fx.compile``: transform if needed, then compile for a backend.

* ``"inductor"``: ``torch.compile(model, fullgraph=True)``. The whole step, the caching decision and
  both branches of every region are one compiled graph: no graph break, no host sync, one compilation
  per input signature (cache contexts and steps compile nothing more).
* ``"tensorrt"``: Torch-TensorRT. Released Torch-TensorRT (2.8 to 2.10) does not convert
  ``torch.cond``: its partitioner leaves the conditional to PyTorch, which would run the skipped
  region's *branches* in eager PyTorch too (converting ``cond`` into TensorRT's ``IIfConditional`` is
  pytorch/TensorRT pull request #4657, open when this was written). So this backend keeps the small
  top-level graph (embeddings, decision, output head) in PyTorch and compiles each region's compute
  branch into its own TensorRT engine with ``torch_tensorrt.compile(ir="dynamo")``. The decision is
  still made on the device; launching the right engine reads the 0-dim predicate (one host sync per
  step, no Python decision logic). For the caching logic inside one engine use
  :func:`adacache_fx.export.to_onnx` and TensorRT's ONNX parser, which converts ``If``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .api import transform
from .config import AdaCacheConfig
from .module import CachedModel, Program

BACKENDS = ("inductor", "tensorrt")


def compile(  # noqa: A001 - mirrors torch.compile
    model: nn.Module, backend: str = "inductor", config: AdaCacheConfig | None = None, **options: Any
):
    """Transform ``model`` (unless it already is) and compile it for ``backend``.

    ``options`` go to ``torch.compile`` (inductor: e.g. ``mode``) or to ``torch_tensorrt.compile``
    (tensorrt: e.g. ``enabled_precisions``, ``workspace_size``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    cached = model if isinstance(model, CachedModel) else transform(model, config)
    if backend == "inductor":
        options.setdefault("fullgraph", True)
        return torch.compile(cached, **options)
    trt = _import_torch_tensorrt()
    cached.register_program_hook(lambda program: _compile_branches(trt, program, options))
    return cached


def _import_torch_tensorrt():
    if not torch.cuda.is_available():
        raise RuntimeError(
            "adacache_fx.compile(backend='tensorrt') needs a CUDA device and none is available; "
            "use backend='inductor' on this machine"
        )
    try:
        import torch_tensorrt
    except ImportError as error:
        raise RuntimeError(
            "adacache_fx.compile(backend='tensorrt') needs Torch-TensorRT: pip install 'adacache-fx[gpu]'"
        ) from error
    return torch_tensorrt


def _compile_branches(trt, program: Program, options: dict) -> None:
    """Replace each region's compute branch by a TensorRT engine built for its operand shapes."""
    gm = program.graph_module
    cond = torch.ops.higher_order.cond
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not cond:
            continue
        branch_name = node.args[1].target
        branch = getattr(gm, branch_name)
        inputs = []
        for operand in node.args[3]:
            value = operand.meta.get("val")
            if value is None:  # a state placeholder: its spec says the shape
                spec = next(s for s in program.layout if f"adacache_{s.name}" == operand.name)
                inputs.append(trt.Input(shape=spec.shape, dtype=spec.dtype))
            else:
                inputs.append(trt.Input(shape=tuple(value.shape), dtype=value.dtype))
        engine = trt.compile(branch, ir="dynamo", inputs=inputs, min_block_size=1, **options)
        setattr(gm, branch_name, engine)
