"""Small helpers over fx graphs shared by the passes."""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.fx as fx

aten = torch.ops.aten

#: Ops a token stream passes through unchanged in value layout (casts, copies, same-shape views).
PASSTHROUGH_OPS = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten._to_copy.default,
    aten.type_as.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.clamp.default,
    aten.view.default,
    aten.reshape.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
}

ADD_OPS = {aten.add.Tensor}
#: The patch-embedding convolutions (frame layout, latent stream).
CONV_OPS = {aten.conv3d.default, aten.conv2d.default, aten.convolution.default}
#: The higher-order op each cached region becomes.
COND = torch.ops.higher_order.cond


def cond_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The ``torch.cond`` nodes of a graph, in order."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target is COND]


class PassError(RuntimeError):
    """A pass could not find the structure it needs in the graph (``stage``: the pass that failed)."""

    def __init__(self, message: str, stage: str | None = None):
        super().__init__(message if stage is None else f"{stage}: {message}")
        self.stage = stage


def fake(node) -> torch.Tensor | None:
    """The fake tensor a node produces (its ``meta['val']``), or None for non-tensor values."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def same_tensor_type(a: fx.Node, b: fx.Node) -> bool:
    ta, tb = fake(a), fake(b)
    return ta is not None and tb is not None and ta.shape == tb.shape and ta.dtype == tb.dtype


def positions(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


def live_ins(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """Values defined outside ``nodes`` and used inside, in first-use order."""
    inside = set(nodes)
    seen: dict[fx.Node, None] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside:
                seen.setdefault(arg)
    return list(seen)


def live_outs(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """Values defined inside ``nodes`` and used outside (output node included), in graph order."""
    inside = set(nodes)
    return [node for node in nodes if any(user not in inside for user in node.users)]


def depends_on(node: fx.Node, ancestor: fx.Node, pos: dict[fx.Node, int]) -> bool:
    """True if ``ancestor`` is a transitive input of ``node``."""
    floor = pos[ancestor]
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        for arg in current.all_input_nodes:
            if arg is ancestor:
                return True
            if arg not in seen and pos[arg] > floor:
                seen.add(arg)
                stack.append(arg)
    return False


def is_view(node: fx.Node) -> bool:
    """True if the node's value may alias another tensor (a view op, or an item of a view op)."""
    target = node.target
    if node.op == "call_function" and target is operator.getitem:
        return is_view(node.args[0])
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return node.op in ("placeholder", "get_attr")
    return any(ret.alias_info is not None for ret in target._schema.returns)


def is_passthrough(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in PASSTHROUGH_OPS or not node.args:
        return False
    source = node.args[0]
    return isinstance(source, fx.Node) and fake(source) is not None and fake(node) is not None and (
        fake(source).shape == fake(node).shape
    )


def passthrough_source(node: fx.Node) -> fx.Node:
    """The value a chain of casts and same-shape views starts from."""
    while is_passthrough(node):
        node = node.args[0]
    return node


def _is_branch_of(branch: fx.Node, stream: fx.Node, pos: dict[fx.Node, int]) -> bool:
    """True if ``branch`` is computed from ``stream`` (or from the value ``stream`` is a cast of)."""
    return depends_on(branch, stream, pos) or depends_on(branch, passthrough_source(stream), pos)


def residual_chain(out: fx.Node, inside: set[fx.Node], pos: dict[fx.Node, int]):
    """Walk back from ``out`` along ``stream = stream + f(stream)``.

    At an ``add(a, b)`` where ``a`` is a transitive input of ``b`` (or the reverse), ``a`` is the stream
    and ``b`` the residual branch ``f``; casts and same-shape views are passed through. Returns
    ``(origin, adds)``: the value outside ``inside`` the walk reached (None if it stopped on another
    op) and the residual adds met, as ``(add_node, stream_operand, branch_operand)`` in execution order.
    """
    stop, adds = residual_walk(out, inside, pos)
    return (None if stop in inside else stop), adds


def residual_walk(out: fx.Node, inside: set[fx.Node], pos: dict[fx.Node, int]):
    """Like :func:`residual_chain`, but return the node the walk stopped on even when it is inside."""
    adds = []
    node = out
    while node in inside:
        if is_passthrough(node):
            node = node.args[0]
            continue
        if node.op == "call_function" and node.target in ADD_OPS and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, fx.Node) and isinstance(b, fx.Node) and same_tensor_type(a, node):
                if _is_branch_of(b, a, pos):
                    adds.append((node, a, b))
                    node = a
                    continue
            if isinstance(a, fx.Node) and isinstance(b, fx.Node) and same_tensor_type(b, node):
                if _is_branch_of(a, b, pos):
                    adds.append((node, b, a))
                    node = b
                    continue
        break
    return node, adds[::-1]
