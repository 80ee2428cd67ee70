"""Graph passes, one concern per module, run in order by :func:`rewrite` (see ``README.md`` here).

The pipeline is the list :data:`PIPELINE` of pass modules: each exposes ``run(ctx) -> summary`` over
one :class:`~.context.PassContext`, which it reads and fills; the summary is logged at debug level on
``logging.getLogger("adacache_fx.passes")``. After the last stage the postconditions of the rewritten
graph are checked (:func:`check_rewrite`). A failing stage raises :class:`PassError` naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.fx as fx

from ..config import CacheConfig
from ..state import StateLayout
from . import (
    drop_identities,
    find_blocks,
    flat_cond_outputs,
    frame_layout,
    hoist_buffer_writes,
    insert_cache,
    layout_barriers,
    plan_metric,
    plan_regions,
    reduce_metric,
)
from .branch_layout import BranchLayout
from .context import PassContext, PolicyNodes
from .graph_utils import PassError, cond_nodes

__all__ = ["PIPELINE", "PassContext", "PassError", "PolicyNodes", "RewriteResult", "check_rewrite", "rewrite", "stage_name"]

logger = logging.getLogger("adacache_fx.passes")

#: The stages, in order. Layout barriers stay last: they pin the operands of the final cond nodes.
PIPELINE = (
    drop_identities,
    hoist_buffer_writes,
    find_blocks,
    plan_regions,
    plan_metric,
    frame_layout,
    insert_cache,
    reduce_metric,
    flat_cond_outputs,
    layout_barriers,
)


def stage_name(stage) -> str:
    """A stage's name in logs and errors: its module's (``find_blocks``)."""
    return stage.__name__.rpartition(".")[2]


@dataclass
class RewriteResult:
    """The rewritten graph module, its state layout, each region's cond layout (in graph order), and
    what the passes found (for reports)."""

    graph_module: fx.GraphModule
    layout: StateLayout
    branch_layouts: list[BranchLayout]
    blocks: list[str]
    regions: list[str]
    metric_sites: list[str]
    frame_layout: tuple[int, int] | None = None


def check_rewrite(ctx: PassContext) -> None:
    """Postconditions of the rewritten graph: one ``torch.cond`` per region; the state placeholders
    follow the user inputs in layout order (named ``adacache_<name>``, which backends rely on); the
    outputs are the user outputs then the returned state, in layout order."""
    graph, layout = ctx.graph, ctx.layout
    conds = cond_nodes(graph)
    if len(conds) != len(ctx.regions):
        raise PassError(f"{len(conds)} torch.cond nodes for {len(ctx.regions)} regions", "check_rewrite")
    for node, branch in zip(conds, ctx.branch_layouts):
        _, _, _, operands = node.args
        if len(operands) != len(branch.operands):
            raise PassError(f"{node.name} has {len(operands)} operands, its layout {len(branch.operands)}",
                            "check_rewrite")
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    expected = [f"adacache_{name}" for name in layout.names]
    if placeholders[ctx.num_user_inputs:] != expected or len(placeholders) != ctx.num_user_inputs + len(layout):
        raise PassError(f"state placeholders {placeholders[ctx.num_user_inputs:]} != layout {expected}", "check_rewrite")
    (outputs,) = graph.output_node().args
    if len(outputs) != ctx.num_user_outputs + len(layout.returned):
        raise PassError(
            f"{len(outputs)} outputs for {ctx.num_user_outputs} user outputs and {len(layout.returned)} returned "
            "state tensors", "check_rewrite",
        )


def rewrite(gm: fx.GraphModule, config: CacheConfig, process_group=None) -> RewriteResult:
    """Run :data:`PIPELINE` over a captured graph module (in place) and return it with its state layout.
    ``process_group``: the context-parallel group to reduce the metric over (default: the graph's)."""
    ctx = PassContext(gm, config, process_group=process_group)
    ctx.num_user_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    ctx.num_user_outputs = len(gm.graph.output_node().args[0])
    for stage in PIPELINE:
        name = stage_name(stage)
        try:
            summary = stage.run(ctx)
        except PassError as error:
            if error.stage is not None:
                raise
            raise PassError(str(error), name) from error
        logger.debug("%s: %s", name, summary)
    check_rewrite(ctx)
    return RewriteResult(gm, ctx.layout, ctx.branch_layouts, [b.path for b in ctx.blocks],
                         [r.name for r in ctx.regions], plan_metric.site_names(ctx), ctx.frame_layout)
