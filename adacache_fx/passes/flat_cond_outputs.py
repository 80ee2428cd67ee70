"""flat_cond_outputs: 1-D ``torch.cond`` outputs in a dynamic-shape program, so ``torch.compile`` traces it.

Matches: a graph whose inputs have symbolic sizes (``transform(..., dynamic_shapes=...)``); in it, each
region's cond outputs that have the shape of one of its operands (:meth:`BranchLayout.shaped_like`: the
streams, values, caches and metric memory, not the metric or gain parts).

Rewrites: each such output into ``reshape(out, [-1])`` in both branches, and each use of it after the cond
into ``view_as(flat, operand)``, the shape it had. Values and the state are unchanged; a static graph is
left as it is.

Why: under ``torch.compile`` Dynamo gives the inputs fresh sizes, and a branch output of shape
``[1, s0*(s1//2)*(s2//2), C]`` has the contiguous stride ``C*Max(1, s0*(s1//2)*(s2//2))`` for its first
dim, which ``torch.cond``'s check of the branches' output strides cannot match to its sizes (it stops
with "output stride is not a simple accumulative multiplication of sizes"). A 1-D output has stride 1.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph_utils import cond_nodes, fake

aten = torch.ops.aten


def symbolic(graph: fx.Graph) -> bool:
    """Whether an input of ``graph`` has a symbolic size."""
    return any(isinstance(d, torch.SymInt) for node in graph.find_nodes(op="placeholder")
               if (value := fake(node)) is not None for d in value.shape)


def _flatten_outputs(branch: fx.GraphModule, indices: list[int]) -> None:
    output = branch.graph.output_node()
    outputs = list(output.args[0])
    with branch.graph.inserting_before(output):
        for i in indices:
            outputs[i] = branch.graph.call_function(aten.reshape.default, (outputs[i], [-1]))
    output.args = (tuple(outputs),)
    branch.graph.lint()
    branch.recompile()


def flatten_cond_outputs(gm: fx.GraphModule, branch_layouts) -> int:
    """Rewrite ``gm`` in place (its conds in the order of ``branch_layouts``); return the outputs flattened."""
    if not symbolic(gm.graph):
        return 0
    count = 0
    for node, layout in zip(cond_nodes(gm.graph), branch_layouts, strict=True):
        _, true_fn, false_fn, operands = node.args
        like = {i: operands[j] for i, j in enumerate(layout.shaped_like()) if j is not None}
        for branch in (true_fn, false_fn):
            _flatten_outputs(getattr(gm, branch.target), sorted(like))
        for item in [user for user in node.users if user.target is operator.getitem and user.args[1] in like]:
            with gm.graph.inserting_after(item):
                shaped = gm.graph.call_function(aten.view_as.default, (item, like[item.args[1]]))
            item.replace_all_uses_with(shaped, delete_user_cb=lambda user, shaped=shaped: user is not shaped)
        count += len(like)
    gm.graph.lint()
    gm.recompile()
    return count


def run(ctx) -> str:
    return f"{flatten_cond_outputs(ctx.graph_module, ctx.branch_layouts)} cond outputs flattened"
