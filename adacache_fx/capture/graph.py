"""A captured call: the graph module, how a real call maps onto its flat inputs, and the key of a call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree


@dataclass
class CapturedGraph:
    """A captured call: a GraphModule over flat inputs, and the specs to (un)flatten a real call.

    ``static_inputs`` names the inputs whose values are constants of the graph (their placeholders
    are unused); ``traced_scalars`` the Python int inputs that are symbolic inputs of the graph (their
    values are not part of the signature); ``folded`` says whether input-independent tensors were
    evaluated eagerly.
    """

    graph_module: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    static_inputs: tuple[str, ...] = ()
    folded: bool = False
    traced_scalars: tuple[str, ...] = ()
    static_scalars: tuple[str, ...] = ()

    def flatten_inputs(self, args: tuple, kwargs: dict) -> list:
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise ValueError(f"call structure changed since capture: {spec} != {self.in_spec}")
        return flat

    def unflatten_outputs(self, flat_outputs) -> Any:
        return pytree.tree_unflatten(list(flat_outputs), self.out_spec)


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_leaves(args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """The flat leaves of a call ``(args, kwargs)`` with readable names: ``hidden_states``, ``arg0``,
    ``added_cond_kwargs.resolution``. Falls back to ``input_{i}`` for containers without key paths."""
    try:
        paths, _ = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    except ValueError:
        return [(f"input_{i}", leaf) for i, leaf in enumerate(pytree.tree_leaves((tuple(args), dict(kwargs))))]
    named = []
    for path, leaf in paths:
        head, rest = path[1], path[2:]
        first = f"arg{_key_name(head)}" if _key_name(path[0]) == "0" else _key_name(head)
        named.append((".".join([first, *(_key_name(k) for k in rest)]), leaf))
    return named


def signature(args: tuple, kwargs: dict, static_inputs=(), traced_scalars=(), dynamic_dims=None) -> tuple:
    """A hashable key of a call: tree structure, tensor shapes/dtypes/devices, non-tensor values, and
    the values of the tensors named in ``static_inputs`` (read on the host: call it eagerly). The Python
    numbers named in ``traced_scalars`` are inputs of the graph: only their type counts.

    ``torch.export`` specializes on all of these, so a new key needs a new capture; the dims named in
    ``dynamic_dims`` (argument name -> dims) are symbolic in the capture and leave the key (``None``).
    """
    flat, spec = pytree.tree_flatten((args, kwargs))
    dynamic_dims = dynamic_dims or {}
    named = static_inputs or traced_scalars or dynamic_dims
    names = [name for name, _ in named_leaves(args, kwargs)] if named else [None] * len(flat)
    leaves = []
    for name, leaf in zip(names, flat):
        if isinstance(leaf, torch.Tensor):
            dims = dynamic_dims.get(name, ())
            shape = tuple(None if d in dims else size for d, size in enumerate(leaf.shape))
            entry = ("T", shape, leaf.dtype, leaf.device.type)
            leaves.append(entry + (tuple(leaf.reshape(-1).tolist()),) if name in static_inputs else entry)
        elif name in traced_scalars:
            leaves.append(("S", type(leaf).__name__))
        else:
            leaves.append(("V", repr(leaf)))
    return (str(spec), tuple(leaves))


def strip_export_wrappers(gm: fx.GraphModule) -> fx.GraphModule:
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
