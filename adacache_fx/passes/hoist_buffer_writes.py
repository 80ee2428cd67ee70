"""hoist_buffer_writes: compute what a forward writes into its buffers outside the blocks.

A lazily filled cache (a rotary table written on the first call, ``self.cached_freqs[:n] = freqs``)
is a buffer the forward writes. The capture functionalizes such a graph, so each write is one
``copy_(buffer, value)`` at the end of the graph, from a value computed where the model computes it:
often inside a block, which a cached step skips.

Matches: ``aten.copy_(get_attr, value)`` nodes (a buffer write) whose ``value`` does not depend on the
call's inputs (it is computed from parameters, buffers and constants only: a cache of the model's own).
Rewrites: moves the nodes that compute ``value`` (its whole ancestry) to the top of the graph, after the
placeholders, in graph order, out of every block (their ``nn_module_stack`` keeps the scopes above the
block list). Every step then computes the value and writes the buffer, as the eager model's call does,
and the blocks that read it take it as an operand. The write itself stays last, so reads of the
buffer's previous value are unchanged.

A write whose value depends on the inputs is left in place: ``plan_regions`` refuses the region that
computes it, naming the buffer (a skipped step would not write it).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .find_blocks import block_scope

aten = torch.ops.aten


def buffer_writes(graph: fx.Graph) -> list[fx.Node]:
    """The ``copy_(get_attr, value)`` nodes of a functionalized graph: its buffer writes."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target is aten.copy_.default
            and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"]


def written_buffer(node: fx.Node) -> str | None:
    """The buffer a ``value`` is written into (``rope.cached_freqs``), if a buffer write uses it."""
    for user in node.users:
        if user.op == "call_function" and user.target is aten.copy_.default and user.args[1] is node \
                and isinstance(user.args[0], fx.Node) and user.args[0].op == "get_attr":
            return user.args[0].target
    return None


def _ancestry(value: fx.Node) -> set[fx.Node] | None:
    """The nodes ``value`` is computed from (itself included), or None if a placeholder (an input) is
    among its ancestors."""
    found, stack = set(), [value]
    while stack:
        node = stack.pop()
        if node.op == "placeholder":
            return None
        if node.op in ("call_function", "get_attr") and node not in found:
            found.add(node)
            stack.extend(node.all_input_nodes)
    return found


def _outside_blocks(node: fx.Node) -> None:
    """Keep only the module scopes above the node's block in its ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack")
    scope = block_scope(node)
    if not stack or scope is None:
        return
    kept = {}
    for key, (path, cls) in stack.items():
        if path == scope or path.startswith(scope + "."):
            break
        kept[key] = (path, cls)
    node.meta["nn_module_stack"] = kept


def hoist_buffer_writes(gm: fx.GraphModule) -> list[str]:
    """Move the computation of input-independent buffer writes to the top of ``gm``'s graph (see the
    module docstring). Returns the names of the buffers whose values were moved."""
    graph = gm.graph
    hoisted: set[fx.Node] = set()
    buffers = []
    for write in buffer_writes(graph):
        ancestry = _ancestry(write.args[1])
        if ancestry is None or not any(block_scope(n) is not None for n in ancestry):
            continue
        hoisted |= ancestry
        buffers.append(write.args[0].target)
    if not hoisted:
        return []
    anchor = next((n for n in graph.nodes if n.op not in ("placeholder", "get_attr")), None)
    for node in [n for n in graph.nodes if n in hoisted]:
        anchor.prepend(node)
        _outside_blocks(node)
    graph.lint()
    gm.recompile()
    return buffers


def run(ctx) -> str:
    moved = hoist_buffer_writes(ctx.graph_module)
    return f"values written into {moved} computed before the blocks" if moved else "no buffer written: skipped"
