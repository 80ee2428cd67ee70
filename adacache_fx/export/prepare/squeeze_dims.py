"""Drop the dims of a ``squeeze`` that are statically not 1.

Matches ``aten.squeeze.dim(x, d)`` and ``aten.squeeze.dims(x, dims)`` where the size of ``x`` at a
given dim is an int other than 1 (from ``meta['val']``): torch returns ``x`` unchanged along that dim,
ONNX's ``Squeeze`` rejects the model (``Dimension of input 1 must be 1``), e.g. PixArt's and Allegro's
``hidden_states.squeeze(1)`` on ``(batch, tokens, dim)``.

Rewrites the node to squeeze only its size-1 dims, or, if none is left, erases it (its uses read ``x``).
A dim whose size is symbolic is left as it is.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...passes.graph_utils import fake

aten = torch.ops.aten


def _kept_dims(node: fx.Node) -> list[int] | None:
    """The dims of a matched squeeze that are (or may be) 1, or None when ``node`` does not match."""
    if node.op != "call_function" or node.target not in (aten.squeeze.dim, aten.squeeze.dims):
        return None
    value = fake(node.args[0])
    if value is None:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims)
    if value.dim() == 0:
        return None
    sizes = [value.shape[d % value.dim()] for d in dims]
    kept = [d for d, size in zip(dims, sizes) if not (isinstance(size, int) and size != 1)]
    return None if len(kept) == len(dims) else kept


def squeeze_dims(gm: fx.GraphModule) -> int:
    """Rewrite the matched squeezes of ``gm`` and its branches (module docstring). Returns how many."""
    from . import graph_modules

    count = 0
    for module in graph_modules(gm):
        graph, before = module.graph, count
        for node in list(graph.nodes):
            kept = _kept_dims(node)
            if kept is None:
                continue
            if kept:
                node.target, node.args, node.kwargs = aten.squeeze.dims, (node.args[0], kept), {}
            else:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
            count += 1
        if count > before:
            graph.lint()
            module.recompile()
    return count


def run(ctx) -> str:
    return f"{squeeze_dims(ctx.graph_module)} squeeze(s) of dims that are not 1 dropped"
