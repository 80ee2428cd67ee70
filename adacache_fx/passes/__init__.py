"""Graph passes, one concern per module, and the one place that runs them in order.

find_blocks -> plan_regions (uses find_streams) -> plan_metric -> frame_layout -> insert_cache
-> layout_barriers
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..config import AdaCacheConfig
from .find_blocks import Block, find_blocks
from .frame_layout import first_batch, infer_frame_layout
from .graph_utils import PassError, fake
from .insert_cache import StateSpec, insert_cache
from .layout_barriers import insert_layout_barriers
from .plan_regions import MetricSite, Region, plan_metric, plan_regions

__all__ = ["PassError", "RewriteResult", "StateSpec", "rewrite"]


@dataclass
class RewriteResult:
    graph_module: fx.GraphModule
    state_specs: list[StateSpec]
    blocks: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    metric_sites: list[str] = field(default_factory=list)
    frame_layout: tuple[int, int] | None = None


def _moreg_layout(graph: fx.Graph, config: AdaCacheConfig, sites: list[MetricSite]) -> tuple[int, int]:
    moreg = config.moreg
    site = sites[0]
    value = fake(site.value if site.value is not None else site.stream.out)
    if moreg.frames is not None:
        batch, frames, per_frame = first_batch(graph), moreg.frames, None
    else:
        inferred = infer_frame_layout(graph)
        if inferred is None:
            raise PassError(
                "MoReg needs the number of latent frames, and this graph has no convolutional patch "
                "embedding to infer it from: set MoRegConfig(frames=T)"
            )
        batch, frames, per_frame = inferred
    expected = None if per_frame is None else batch * frames * per_frame * value.shape[-1]
    if frames < 2 or value.numel() % (batch * frames) or (expected is not None and value.numel() != expected):
        raise PassError(
            f"MoReg cannot lay out the metric residual of shape {tuple(value.shape)} (at {site.block.path}) as "
            f"[batch={batch}, frames={frames}, tokens per frame={per_frame}, channels]: it holds other tokens "
            "(e.g. text concatenated to the video) or no frames. Choose a metric_block whose stream holds "
            "only video tokens, or set MoRegConfig(frames=T) to force the layout"
        )
    layout = (batch, frames)
    if max(moreg.strides) >= frames:
        raise PassError(f"MoReg strides {moreg.strides} must be smaller than the {frames} latent frames")
    return layout


def rewrite(gm: fx.GraphModule, config: AdaCacheConfig) -> RewriteResult:
    """Run the passes over a captured graph module (in place) and return it with its state layout."""
    graph = gm.graph
    blocks: list[Block] = find_blocks(graph)
    regions: list[Region] = plan_regions(graph, blocks, config.granularity)
    sites = plan_metric(graph, blocks, regions, config.metric_blocks, config.metric_branch)
    layout = _moreg_layout(graph, config, sites) if config.moreg is not None else None
    result = RewriteResult(
        graph_module=gm,
        state_specs=[],
        blocks=[b.path for b in blocks],
        regions=[r.name for r in regions],
        metric_sites=[
            f"{s.block.path} branch {config.metric_branch}" if s.value is not None else f"{s.block.path} (block)"
            for s in sites
        ],
        frame_layout=layout,
    )
    _, result.state_specs = insert_cache(
        gm,
        regions,
        sites,
        codebook=dict(config.codebook),
        moreg=config.moreg,
        frame_layout=layout,
        compute_steps=config.compute_steps,
        warmup_steps=config.warmup_steps,
        extrapolation_order=config.extrapolation_order,
    )
    insert_layout_barriers(gm)
    return result
