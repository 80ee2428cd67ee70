"""frame_layout: infer (batch, latent frames) from the patch embedding, for motion regularization.

Matches the first convolution that reads a graph input: a 3-D convolution over ``[B, C, T, H, W]``
gives ``T`` directly; a 2-D one over frames folded into the batch gives ``T = out_batch / B`` with
``B`` the batch of the input it reads; tokens per frame are the output's spatial size. Rewrites nothing.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import fake

aten = torch.ops.aten
CONV_OPS = {aten.conv3d.default, aten.conv2d.default, aten.convolution.default}


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
