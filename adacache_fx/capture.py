"""Capture: turn a model call into a flat fx graph with ``torch.export`` (non-strict).

``torch.fx.symbolic_trace`` fails on diffusers transformers; non-strict ``torch.export`` captures them
with ``nn_module_stack`` metadata on every node, which the passes use to find the block stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


@dataclass
class CapturedGraph:
    """A captured call: a GraphModule over flat inputs, and the specs to (un)flatten a real call."""

    graph_module: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec

    def flatten_inputs(self, args: tuple, kwargs: dict) -> list:
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise ValueError(f"call structure changed since capture: {spec} != {self.in_spec}")
        return flat

    def unflatten_outputs(self, flat_outputs) -> Any:
        return pytree.tree_unflatten(list(flat_outputs), self.out_spec)


def signature(args: tuple, kwargs: dict) -> tuple:
    """A hashable key of a call: tree structure, tensor shapes/dtypes/devices and non-tensor values.

    ``torch.export`` specializes on all of these, so a new key needs a new capture.
    """
    flat, spec = pytree.tree_flatten((args, kwargs))
    leaves = []
    for leaf in flat:
        if isinstance(leaf, torch.Tensor):
            leaves.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device.type))
        else:
            leaves.append(("V", repr(leaf)))
    return (str(spec), tuple(leaves))


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, functional: bool = False) -> CapturedGraph:
    """Export ``model(*args, **kwargs)`` and return a clean GraphModule over the flat inputs.

    The result has plain positional placeholders (one per flattened input, non-tensors included),
    returns a flat tuple, and shares its parameters and buffers with ``model``. The export's input
    guard module and pytree codegen are removed so that ``torch.compile`` can trace it.

    ``functional=True`` also functionalizes the graph (no op is decomposed): in-place updates, like a
    rotary embedding written into slices of ``empty_like``, become data edges. Regions cut *inside* a
    block need that; whole-block regions keep such updates inside the region, and the non-functional
    graph runs about 10% faster in eager mode (compile and ONNX export functionalize anyway).
    """
    name = type(model).__name__
    try:
        with torch.no_grad():
            program = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
            if functional:
                program = program.run_decompositions({})
    except Exception as error:  # noqa: BLE001 - re-raised with context
        op = _failing_op(error)
        raise CaptureError(
            f"adacache_fx could not capture {name} with torch.export(strict=False)"
            f"{f' at {op}' if op else ''}: {type(error).__name__}: {str(error).splitlines()[0][:300]}\n"
            "What you can do: make the forward traceable by torch.export (see the error above; data-"
            "dependent Python control flow is the usual cause), or transform the submodule that holds "
            "the transformer blocks instead of the whole model."
        ) from error
    gm = _strip_export_wrappers(program.module())
    return CapturedGraph(gm, program.call_spec.in_spec, program.call_spec.out_spec)


def _strip_export_wrappers(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule without the input guards, hooks and pytree codegen of ``ep.module()``."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()
    output = graph.output_node()
    (outputs,) = output.args
    output.args = (tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,),)
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__.split(".")[-1])


def _failing_op(error: BaseException) -> str | None:
    text = str(error)
    for marker in ("aten.", "torch.ops."):
        at = text.find(marker)
        if at >= 0:
            return text[at:].split()[0].rstrip(",.:)")
    return None
