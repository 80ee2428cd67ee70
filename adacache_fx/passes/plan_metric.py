"""plan_metric: where the decision metric is read (``MetricSite``), as the policy needs it.

Matches, for a policy with an early signal (``Needs.early_signal``), the signal site of
:mod:`.plan_signal`, outside every region (site 0); then, for a policy that reads a metric residual
(``Needs.metric``), branch ``metric_branch`` of each metric block (``metric_block``, default the middle
one) on its primary stream, inside the regions; none for a policy that reads neither (MagCache).
Rewrites nothing.
"""

from __future__ import annotations

import torch.fx as fx

from .find_blocks import Block
from .find_streams import pair_streams, primary_stream
from .graph_utils import PassError, positions
from .plan_regions import MetricSite, Region
from .plan_signal import plan_signal


def plan_metric(
    graph: fx.Graph, blocks: list[Block], regions: list[Region], metric_blocks, metric_branch: int
) -> list[MetricSite]:
    """Locate the residual(s) that drive the decision: branch ``metric_branch`` of each metric block."""
    pos = positions(graph)
    if metric_blocks is None:
        metric_blocks = (len(blocks) // 2,)
    sites = []
    for index in metric_blocks:
        if not -len(blocks) <= index < len(blocks):
            raise PassError(f"metric_block {index} is out of range: the stack has {len(blocks)} blocks")
        block = blocks[index]
        streams, _ = pair_streams(block.nodes, pos)
        if not streams:
            raise PassError(f"metric block {block.path} has no residual stream")
        stream = primary_stream(streams, graph, blocks[:index % len(blocks)], pos)
        if stream.adds:
            if metric_branch >= len(stream.adds):
                raise PassError(
                    f"metric_branch {metric_branch} is out of range: block {block.path} has "
                    f"{len(stream.adds)} residual branches on its main stream"
                )
            value = stream.adds[metric_branch][2]
        elif metric_branch == 0:
            value = None  # no residual add found: the whole block's residual out - inp
        else:
            raise PassError(f"block {block.path} has no separable residual branches; use metric_branch=0")
        if value is not None:
            region = next((i for i, r in enumerate(regions) if value in r.nodes), None)
        else:
            region = next((i for i, r in enumerate(regions) if block in r.blocks), None)
        if region is None:
            raise PassError(f"the metric residual of block {block.path} is not inside a cached region")
        sites.append(MetricSite(block, region, value, stream))
    return sites


def site_names(ctx) -> list[str]:
    """Readable names of the metric sites (reports, logs)."""
    def name(site: MetricSite) -> str:
        if site.region is None:
            what = "block" if site.value is None else "modulated input"
            return f"{site.block.path} ({what}, early signal)"
        return f"{site.block.path} branch {ctx.config.metric_branch}" if site.value is not None \
            else f"{site.block.path} (block)"

    return [name(site) for site in ctx.sites]


def run(ctx) -> str:
    needs = ctx.needs
    ctx.sites = []
    if needs.early_signal is not None:  # under context parallelism its parts are reduced before decide
        ctx.sites += plan_signal(ctx.graph, ctx.blocks, needs.early_signal)
    if needs.metric:
        ctx.sites += plan_metric(ctx.graph, ctx.blocks, ctx.regions, ctx.config.metric_blocks,
                                 ctx.config.metric_branch)
    return f"metric at {site_names(ctx)}" if ctx.sites else "no metric: the policy reads none"
