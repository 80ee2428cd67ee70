"""Compute ``masked_fill`` / ``where`` in a dtype ONNX Runtime's ``Where`` implements.

Matches ``aten.masked_fill`` (``.Scalar``, ``.Tensor``) and ``aten.where`` (``.self``, ``.ScalarSelf``,
``.ScalarOther``, ``.Scalar``) whose output dtype (``meta['val'].dtype``) is one ONNX Runtime's CPU
``Where`` has no kernel for (:data:`WIDER`: bool, bfloat16, int16, uint16; ``NOT_IMPLEMENTED ...
Where(16)``), e.g. HunyuanVideo's ``attention_mask.masked_fill(mask_indices, False)`` on a bool mask.

Rewrites the node to cast its value operands to the wider type of :data:`WIDER` (scalars rounded to
the original dtype first), select there, and cast the result back::

    y = masked_fill(x_bool, m, False)  ---->  y = masked_fill(x_bool.to(uint8), m, 0).to(bool)

Every value of the original dtype is exact in the wider one, so the result is the same, bit for bit.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...passes.graph_utils import fake

aten = torch.ops.aten

#: Dtypes ONNX Runtime's CPU ``Where`` lacks (onnxruntime 1.17 to 1.23), and the type each is computed in.
WIDER = {
    torch.bool: torch.uint8,
    torch.bfloat16: torch.float32,
    torch.int16: torch.int32,
    torch.uint16: torch.int32,
}
#: op -> the positions of its value operands (tensors or scalars); the others are the condition or mask.
VALUE_ARGS = {
    aten.masked_fill.Scalar: (0, 2),
    aten.masked_fill.Tensor: (0, 2),
    aten.where.self: (1, 2),
    aten.where.ScalarSelf: (1, 2),
    aten.where.ScalarOther: (1, 2),
    aten.where.Scalar: (1, 2),
}


def _scalar(value, dtype: torch.dtype, wide: torch.dtype):
    """A Python scalar as ``dtype`` holds it, then as a ``wide`` value (what torch's select writes)."""
    rounded = torch.tensor(value).to(dtype).to(wide)
    return rounded.item()


def _new_node(graph: fx.Graph, like: fx.Node, target, args, value) -> fx.Node:
    node = graph.call_function(target, args)
    node.meta = {k: v for k, v in like.meta.items() if k in ("stack_trace", "nn_module_stack", "source_fn_stack")}
    if value is not None:
        node.meta["val"] = value
    return node


def _fake_as(value: torch.Tensor | None, dtype: torch.dtype):
    mode = getattr(value, "fake_mode", None)
    if mode is None:
        return None
    with mode:
        return torch.empty_strided(value.shape, value.stride(), dtype=dtype, device=value.device)


def widen(node: fx.Node) -> bool:
    """Rewrite one matched node (module docstring); False if ``node`` does not match."""
    positions = VALUE_ARGS.get(node.target) if node.op == "call_function" else None
    out = fake(node)
    if positions is None or out is None or out.dtype not in WIDER:
        return False
    dtype, wide = out.dtype, WIDER[out.dtype]
    graph = node.graph
    args = list(node.args)
    with graph.inserting_before(node):
        for i in positions:
            if isinstance(args[i], fx.Node):
                source = args[i]
                args[i] = _new_node(graph, node, aten._to_copy.default, (source,), _fake_as(fake(source), wide))
                args[i].kwargs = {"dtype": wide}
            else:
                args[i] = _scalar(args[i], dtype, wide)
        select = _new_node(graph, node, node.target, tuple(args), _fake_as(out, wide))
        back = _new_node(graph, node, aten._to_copy.default, (select,), out)
        back.kwargs = {"dtype": dtype}
    node.replace_all_uses_with(back)
    graph.erase_node(node)
    return True


def where_dtypes(gm: fx.GraphModule) -> int:
    """Rewrite the matched selects of ``gm`` and its branches (module docstring). Returns how many."""
    from . import graph_modules

    count = 0
    for module in graph_modules(gm):
        changed = sum(widen(node) for node in list(module.graph.nodes))
        if changed:
            module.graph.lint()
            module.recompile()
        count += changed
    return count


def run(ctx) -> str:
    return f"{where_dtypes(ctx.graph_module)} masked_fill/where node(s) computed in a type ONNX Runtime implements"
