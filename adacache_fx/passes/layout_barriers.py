"""layout_barriers: pin the layout of every ``torch.cond`` operand computed inside the graph.

Matches: operands of ``torch.ops.higher_order.cond`` nodes that are neither graph inputs nor
parameters. Rewrites each into ``layout_barrier(operand)`` (see :mod:`adacache_fx.ops`), the identity
in eager mode and under ``torch.export``, a layout-fixing custom op under ``torch.compile``.
"""

from __future__ import annotations

import torch.fx as fx

from ..ops import layout_barrier
from .graph_utils import cond_nodes


def insert_layout_barriers(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place; return the number of barriers inserted."""
    count = 0
    for node in cond_nodes(gm.graph):
        pred, true_fn, false_fn, operands = node.args
        pinned = []
        for operand in operands:
            if isinstance(operand, fx.Node) and operand.op not in ("placeholder", "get_attr"):
                with gm.graph.inserting_before(node):
                    barrier = gm.graph.call_function(layout_barrier, (operand,))
                barrier.meta = dict(operand.meta)
                pinned.append(barrier)
                count += 1
            else:
                pinned.append(operand)
        node.args = (pred, true_fn, false_fn, tuple(pinned))
    gm.graph.lint()
    gm.recompile()
    return count


def run(ctx) -> str:
    return f"{insert_layout_barriers(ctx.graph_module)} layout barriers"
