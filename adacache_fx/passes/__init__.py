"""Graph passes, one concern per module, run in order by :func:`rewrite` (see ``README.md`` here).

The pipeline is the list :data:`PIPELINE`: each stage has one signature, ``stage(ctx) -> summary``,
reads and fills a :class:`PassContext`, and logs its summary at debug level on
``logging.getLogger("adacache_fx.passes")``. After the last stage the postconditions of the rewritten
graph are checked (:func:`check_rewrite`). A failing stage raises :class:`PassError` naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.fx as fx

from ..config import CacheConfig
from ..parallel import SequenceShard
from ..policies import policy_class
from ..state import StateLayout
from .branch_layout import BranchLayout
from .drop_identities import drop_identities
from .find_blocks import Block, find_blocks
from .frame_layout import moreg_layout
from .graph_utils import PassError
from .hoist_buffer_writes import hoist_buffer_writes
from .insert_cache import insert_cache
from .layout_barriers import insert_layout_barriers
from .plan_regions import MetricSite, Region, plan_metric, plan_regions
from .plan_signal import cached_blocks, plan_signal
from .reduce_metric import group_name, reduce_metric

__all__ = ["PIPELINE", "PassContext", "PassError", "RewriteResult", "Stage", "check_rewrite", "rewrite"]

logger = logging.getLogger("adacache_fx.passes")

@dataclass
class PassContext:
    """What the stages share: the graph module being rewritten, the config, and what each stage found."""

    graph_module: fx.GraphModule
    config: CacheConfig
    num_user_inputs: int = 0
    num_user_outputs: int = 0
    blocks: list[Block] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    sites: list[MetricSite] = field(default_factory=list)
    frame_layout: tuple[int, int] | None = None
    shard: SequenceShard | None = None  # the metric residual's, under context parallelism (MoReg)
    layout: StateLayout | None = None
    branch_layouts: list[BranchLayout] = field(default_factory=list)
    process_group: object = None  # the context-parallel group (ProcessGroup or name), None: from the graph

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[PassContext], str]


def _drop_identities(ctx: PassContext) -> str:
    return f"{drop_identities(ctx.graph_module)} no-op nodes dropped"


def _hoist_buffer_writes(ctx: PassContext) -> str:
    moved = hoist_buffer_writes(ctx.graph_module)
    return f"values written into {moved} computed before the blocks" if moved else "no buffer written: skipped"


def _find_blocks(ctx: PassContext) -> str:
    ctx.blocks = find_blocks(ctx.graph)
    return f"{len(ctx.blocks)} blocks: {ctx.blocks[0].path} .. {ctx.blocks[-1].path}"


def _early_signal(ctx: PassContext) -> str | None:
    """The early signal the config's policy decides from (``Policy.early_signal``), or None."""
    return getattr(policy_class(ctx.config), "early_signal", None)


def _plan_regions(ctx: PassContext) -> str:
    blocks = cached_blocks(ctx.blocks, _early_signal(ctx))
    ctx.regions = plan_regions(ctx.graph, blocks, ctx.config.granularity)
    return f"{len(ctx.regions)} regions ({ctx.config.granularity}): {[r.name for r in ctx.regions]}"


def _plan_metric(ctx: PassContext) -> str:
    if not policy_class(ctx.config).uses_metric:
        ctx.sites = []
        return "no metric: the policy reads none"
    signal = _early_signal(ctx)
    if signal is not None:  # under context parallelism its parts are reduced before decide (reduce_metric)
        ctx.sites = plan_signal(ctx.graph, ctx.blocks, signal)
    else:
        ctx.sites = plan_metric(ctx.graph, ctx.blocks, ctx.regions, ctx.config.metric_blocks,
                                ctx.config.metric_branch)
    return f"metric at {_site_names(ctx)}"


def _frame_layout(ctx: PassContext) -> str:
    if ctx.config.moreg is None:
        return "no MoReg: skipped"
    name = group_name(ctx.graph_module, ctx.process_group)
    group = dist.distributed_c10d._resolve_process_group(name) if name and dist.is_initialized() else None
    world = 1 if group is None else dist.get_world_size(group)
    site = ctx.sites[0]
    value = site.value if site.value is not None else site.stream.out
    batch, frames, sharded = moreg_layout(ctx.graph, ctx.config.moreg, value, site.block.path, world)
    ctx.frame_layout = (batch, frames)
    if sharded:
        ctx.shard = SequenceShard(name, dist.get_rank(group), world)
    return f"metric residual laid out as (batch, frames) = {ctx.frame_layout}" + (f", {ctx.shard}" if sharded else "")


def _insert_cache(ctx: PassContext) -> str:
    ctx.layout, ctx.branch_layouts = insert_cache(ctx.graph_module, ctx.regions, ctx.sites, ctx.config,
                                                  ctx.frame_layout, ctx.shard)
    return f"{len(ctx.regions)} torch.cond, {len(ctx.layout)} state tensors"


def _reduce_metric(ctx: PassContext) -> str:
    added = reduce_metric(ctx.graph_module, ctx.process_group)
    return f"{added} all-reduce(s) of the metric parts per step" if added else "no collectives: skipped"


def _layout_barriers(ctx: PassContext) -> str:
    return f"{insert_layout_barriers(ctx.graph_module)} layout barriers"


#: The stages, in order. Layout barriers stay last: they pin the operands of the final cond nodes.
PIPELINE: tuple[Stage, ...] = (
    Stage("drop_identities", _drop_identities),
    Stage("hoist_buffer_writes", _hoist_buffer_writes),
    Stage("find_blocks", _find_blocks),
    Stage("plan_regions", _plan_regions),
    Stage("plan_metric", _plan_metric),
    Stage("frame_layout", _frame_layout),
    Stage("insert_cache", _insert_cache),
    Stage("reduce_metric", _reduce_metric),
    Stage("layout_barriers", _layout_barriers),
)


def _site_names(ctx: PassContext) -> list[str]:
    branch = ctx.config.metric_branch
    def name(site: MetricSite) -> str:
        if site.region is None:
            what = "block" if site.value is None else "modulated input"
            return f"{site.block.path} ({what}, early signal)"
        return f"{site.block.path} branch {branch}" if site.value is not None else f"{site.block.path} (block)"

    return [name(site) for site in ctx.sites]


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
    conds = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.cond]
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
        try:
            summary = stage.run(ctx)
        except PassError as error:
            if error.stage is not None:
                raise
            raise PassError(str(error), stage.name) from error
        logger.debug("%s: %s", stage.name, summary)
    check_rewrite(ctx)
    return RewriteResult(gm, ctx.layout, ctx.branch_layouts, [b.path for b in ctx.blocks],
                         [r.name for r in ctx.regions], _site_names(ctx), ctx.frame_layout)
