"""frame_layout: the (batch, latent frames) layout of the metric residual, for a policy that reads motion
(``Needs.frames``: MoReg).

Matches the first convolution that reads a graph input: a 3-D convolution over ``[B, C, T, H, W]``
gives ``T`` directly; a 2-D one over frames folded into the batch gives ``T = out_batch / B`` with
``B`` the batch of the input it reads; tokens per frame are the output's spatial size. Checks that the
metric residual holds exactly ``B x T x tokens per frame`` tokens. Rewrites nothing.

Under context parallelism over ``world`` ranks the metric residual may hold a rank's chunk of them
(``1 / world``: the patch embedding runs before the split); it is then a shard, and MoReg adds the frame
pairs that straddle two ranks' chunks (:class:`~adacache_fx.parallel.SequenceShard`). With a forced
frame count (``MoRegConfig(frames=T)``: no token count to compare with) it is taken to be a shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx

from ..parallel import SequenceShard
from .graph_utils import CONV_OPS, PassError, fake
from .reduce_metric import group_name

aten = torch.ops.aten


def _source_placeholder(node: fx.Node) -> fx.Node | None:
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return current
        for arg in current.all_input_nodes:
            if arg not in seen and arg.op != "get_attr":
                seen.add(arg)
                stack.append(arg)
    return None


def infer_frame_layout(graph: fx.Graph) -> tuple[int, int, int] | None:
    """Return ``(batch, frames, tokens_per_frame)``, or None without a convolutional patch embedding."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in CONV_OPS:
            continue
        source = _source_placeholder(node.args[0])
        out = fake(node)
        if source is None or out is None or fake(source) is None:
            continue
        batch = fake(source).shape[0]
        if out.dim() == 5:
            return int(out.shape[0]), int(out.shape[2]), int(out.shape[3] * out.shape[4])
        if out.dim() == 4 and out.shape[0] % batch == 0:
            return int(batch), int(out.shape[0] // batch), int(out.shape[2] * out.shape[3])
        return None
    return None


def first_batch(graph: fx.Graph) -> int | None:
    """The leading dimension of the first tensor input."""
    for node in graph.nodes:
        if node.op == "placeholder" and fake(node) is not None and fake(node).dim() > 0:
            return int(fake(node).shape[0])
    return None


def motion_layout(graph: fx.Graph, needs, site_value: fx.Node, site_path: str,
                  world: int = 1) -> tuple[int, int, bool]:
    """``(batch, frames, sharded)`` of the metric residual ``site_value`` for a rule that reads motion
    (``needs``: its :class:`~adacache_fx.policies.FrameNeeds`), or a PassError saying what to set.
    ``world``: the ranks of the context-parallel group (1: one process); ``sharded``: the residual holds
    one rank's chunk of the tokens."""
    value = fake(site_value)
    if needs.count is not None:
        batch, frames, per_frame = first_batch(graph), needs.count, None
    else:
        inferred = infer_frame_layout(graph)
        if inferred is None:
            raise PassError(
                "MoReg needs the number of latent frames T, and this model has no convolutional patch "
                "embedding to infer it from (it packs its tokens with a linear layer, as LTX-Video and Flux "
                f"do): set {needs.setting} for a video model; an image model has no motion to "
                "regularize (use moreg=None)"
            )
        batch, frames, per_frame = inferred
        if frames == 1:
            raise PassError(
                "MoReg is for video: this model's patch embedding reads single images (1 frame), so there "
                "is no motion to measure; use AdaCacheConfig(moreg=None)"
            )
    expected = None if per_frame is None else batch * frames * per_frame * value.shape[-1]
    sharded = world > 1 and value.numel() != expected
    numel = value.numel() * (world if sharded else 1)
    if frames < 2 or numel % (batch * frames) or (expected is not None and numel != expected):
        raise PassError(
            f"MoReg cannot lay out the metric residual of shape {tuple(value.shape)} (at {site_path}"
            f"{f', a shard of {world} ranks' if world > 1 else ''}) as [batch={batch}, frames={frames}, tokens "
            f"per frame={per_frame}, channels]: it holds other tokens (e.g. text concatenated to the video) or "
            f"no frames. Choose a metric_block whose stream holds only video tokens, or set {needs.setting} "
            "to force the layout"
        )
    if needs.max_stride >= frames:
        raise PassError(f"MoReg strides up to {needs.max_stride} must be smaller than the {frames} latent frames")
    return batch, frames, sharded


def run(ctx) -> str:
    """The stage: :func:`motion_layout` of metric site 0 when the policy reads motion."""
    needs = ctx.needs.frames
    if needs is None:
        return "no motion read: skipped"
    name = group_name(ctx.graph_module, ctx.process_group)
    group = dist.distributed_c10d._resolve_process_group(name) if name and dist.is_initialized() else None
    world = 1 if group is None else dist.get_world_size(group)
    site = ctx.sites[0]
    value = site.value if site.value is not None else site.stream.out
    batch, frames, sharded = motion_layout(ctx.graph, needs, value, site.block.path, world)
    ctx.frame_layout = (batch, frames)
    if sharded:
        ctx.shard = SequenceShard(name, dist.get_rank(group), world)
    return f"metric residual laid out as (batch, frames) = {ctx.frame_layout}" + (f", {ctx.shard}" if sharded else "")
