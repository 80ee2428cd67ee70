"""``adacache_fx.compile``: transform if needed, then compile for a backend.

* ``"inductor"``: ``torch.compile(model, fullgraph=True)``. The whole step, the caching decision and
  both branches of every region are one compiled graph: no graph break, no host sync, one compilation
  per input signature (cache contexts and steps compile nothing more).
* ``"tensorrt"``: Torch-TensorRT. Released Torch-TensorRT does not convert ``torch.cond``: its
  partitioner leaves the conditional to PyTorch, which would run the skipped region's *branches* in
  eager PyTorch too (converting ``cond`` into TensorRT's ``IIfConditional`` is pytorch/TensorRT pull
  request #4657). So this backend keeps the small top-level graph (embeddings, decision, output head)
  in PyTorch and replaces each region's compute branch by its own TensorRT engine
  (``torch_tensorrt.compile(ir="dynamo")``), built on the branch's first call from the real operands'
  shapes and dtypes. The decision is still made on the device; launching a region's engine reads its
  0-dim predicate: one host sync per region per step, no Python decision logic. For the caching logic
  inside one engine use :func:`adacache_fx.export.to_onnx` and TensorRT's ONNX parser, which converts
  ``If``.

Verified on CPU against a stand-in of ``torch_tensorrt`` only (tests/standins); awaiting a GPU run.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from .api import transform
from .module import CachedModel
from .policies import AdaCacheConfig
from .program import Program

BACKENDS = ("inductor", "tensorrt")

#: The TensorRT options each CachedModel was compiled with (one program hook per model).
_COMPILED: weakref.WeakKeyDictionary[CachedModel, dict] = weakref.WeakKeyDictionary()


def compile(  # noqa: A001 - mirrors torch.compile
    model: nn.Module, backend: str = "inductor", config: AdaCacheConfig | None = None, **options: Any
):
    """Transform ``model`` (unless it already is) and compile it for ``backend``.

    ``options`` go to ``torch.compile`` (inductor: e.g. ``mode``) or to ``torch_tensorrt.compile``
    (tensorrt: e.g. ``workspace_size``, ``min_block_size``; the precision is the model's dtype: cast
    it with ``model.half()`` before, as Torch-TensorRT's Dynamo path types engines from the module).
    A model that is already transformed keeps its config: ``config`` must then be None or equal.

    >>> compiled = adacache_fx.compile(model, config=adacache_fx.AdaCacheConfig(num_steps=30))  # doctest: +SKIP
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(model, CachedModel):
        if config is not None and config != model.adacache_config:
            raise ValueError(
                "adacache_fx.compile: the model is already transformed with a different config "
                f"({model.adacache_config}); transform the original model with the new config instead"
            )
        cached = model
    else:
        cached = transform(model, config)
    if backend == "inductor":
        options.setdefault("fullgraph", True)
        return torch.compile(cached, **options)
    return _compile_tensorrt(cached, options)


def _compile_tensorrt(cached: CachedModel, options: dict) -> CachedModel:
    if "enabled_precisions" in options:
        raise ValueError(
            "enabled_precisions is ignored by Torch-TensorRT's Dynamo path (engines are typed from the "
            "module): cast the model instead, e.g. model.half() or model.to(torch.bfloat16)"
        )
    options = {"min_block_size": 1, **options}
    previous = _COMPILED.get(cached)
    if previous is not None:
        if previous != options:
            raise ValueError(
                f"this model is already compiled with TensorRT options {previous}; transform the original "
                "model again to compile it with other options"
            )
        return cached
    trt = _import_torch_tensorrt()
    cached.register_program_hook(lambda program: compile_branches(trt, program, options))
    _COMPILED[cached] = options
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


def cond_nodes(gm: torch.fx.GraphModule):
    """``(node, pred, true_fn, false_fn, operands)`` of each ``torch.cond`` node (true: the compute branch)."""
    cond = torch.ops.higher_order.cond
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is cond:
            pred, true_fn, false_fn, operands = node.args
            yield node, pred, true_fn, false_fn, operands


class TensorRTBranch(nn.Module):
    """A region's compute branch, run by a TensorRT engine built on its first call.

    The engine's inputs are typed from the real operands (shape and dtype), so every operand has a
    type whatever the passes left in the graph's metadata. ``engine`` is None until then.
    """

    def __init__(self, trt, branch: nn.Module, options: dict):
        super().__init__()
        self.branch = branch
        self.engine = None
        self.calls = 0
        self._trt, self._options = trt, options

    def forward(self, *operands):
        if self.engine is None:
            inputs = [self._trt.Input(shape=tuple(t.shape), dtype=t.dtype) for t in operands]
            self.engine = self._trt.compile(self.branch, ir="dynamo", inputs=inputs, **self._options)
        self.calls += 1
        out = self.engine(*operands)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def compile_branches(trt, program: Program, options: dict) -> int:
    """Replace each region's compute branch by a :class:`TensorRTBranch`; returns how many it replaced
    (0 when the program's branches already are)."""
    gm = program.graph_module
    replaced = 0
    for _, _, true_fn, _, _ in cond_nodes(gm):
        branch = getattr(gm, true_fn.target)
        if not isinstance(branch, TensorRTBranch):
            setattr(gm, true_fn.target, TensorRTBranch(trt, branch, options))
            replaced += 1
    if replaced:
        program.changed()
    return replaced
