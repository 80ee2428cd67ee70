"""Drop the nodes of a captured graph that do nothing at inference.

Matches, by the fake tensors of ``torch.export``'s metadata:

- ``aten._assert_tensor_metadata`` (a run-time check ``.to()`` leaves behind; returns nothing);
- ``aten.to`` / ``aten.type_as`` to the dtype, device and layout the input already has, without
  ``copy=True`` or a memory format (eager returns the input itself);
- ``aten.contiguous`` of an input that is contiguous already (eager returns the input itself);
- ``aten.dropout`` with ``train=False`` (returns the input).

Rewrites each match's uses to its input and erases it. Eager returns the very same tensor for every
match, so the graph computes the same values with the same aliasing; an interpreted graph (the eager
``CachedModel``, the compute branch of every ``torch.cond``) calls a third fewer ops on a DiT block.
Compiled graphs lose nothing: Inductor drops these itself.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import fake

aten = torch.ops.aten

_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default}
_SAFE_CAST_KWARGS = {"dtype", "layout", "device", "pin_memory", "non_blocking", "copy"}


def _same_type(node: fx.Node, source: fx.Node) -> bool:
    out, inp = fake(node), fake(source)
    if out is None or inp is None:
        return False
    return (out.dtype, out.device, out.layout, out.shape, out.stride()) == (
        inp.dtype, inp.device, inp.layout, inp.shape, inp.stride())


def _identity_input(node: fx.Node) -> fx.Node | None:
    """The input ``node`` returns unchanged, or None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    if node.target in _CASTS:
        names = [a.name for a in node.target._schema.arguments]
        given = {**dict(zip(names, node.args)), **node.kwargs}
        if given.get("copy") or given.get("memory_format") is not None or set(given) - _SAFE_CAST_KWARGS - {names[0], "other"}:
            return None
        return source if _same_type(node, source) else None
    if node.target is aten.contiguous.default:
        value = fake(source)
        return source if value is not None and value.is_contiguous() and _same_type(node, source) else None
    if node.target is aten.dropout.default:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
        return source if train is False else None
    return None


def drop_identities(gm: fx.GraphModule) -> int:
    """Erase the no-op nodes of ``gm`` (see the module docstring). Returns how many were erased."""
    graph = gm.graph
    dropped = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
            dropped += 1
            continue
        source = _identity_input(node)
        if source is not None:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            dropped += 1
    if dropped:
        graph.lint()
        gm.recompile()
    return dropped


def run(ctx) -> str:
    return f"{drop_identities(ctx.graph_module)} no-op nodes dropped"
