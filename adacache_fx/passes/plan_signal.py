"""plan_signal: where a policy with an early signal (:attr:`Policy.early_signal`) reads it.

Matches the first block of the stack and its latent stream (:func:`~.find_streams.primary_stream`), and
returns the signal as metric site 0, read in the main graph (``MetricSite.region`` is None):

* ``"first_block"``: the block's residual ``out - inp`` on that stream (``MetricSite.value`` None). The
  regions are then planned over the blocks after it (:func:`cached_blocks`): the first block runs on
  every step.
* ``"modulated_input"``: the input of the block's first linear layer that depends on the stream (the
  timestep-modulated, normalized latent: :func:`modulated_input`). The regions cover every block;
  ``insert_signal`` copies the value's ancestors inside the block into the main graph.

Rewrites nothing.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .find_blocks import Block
from .find_streams import pair_streams, primary_stream
from .graph_utils import PassError, depends_on, positions
from .plan_regions import MetricSite

#: The early signals the passes can read, and how many leading blocks each leaves uncached.
SIGNALS = {"first_block": 1, "modulated_input": 0}

aten = torch.ops.aten
#: The ops whose first argument is the input of a linear layer.
LINEAR_OPS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default)


def cached_blocks(blocks: list[Block], early_signal: str | None) -> list[Block]:
    """The blocks the regions cover: all of them, or those after the blocks an early signal reads."""
    if early_signal is None:
        return blocks
    if early_signal not in SIGNALS:
        raise PassError(f"unknown early signal {early_signal!r}; the passes read {sorted(SIGNALS)}")
    skip = SIGNALS[early_signal]
    if len(blocks) <= skip:
        raise PassError(f"early signal {early_signal!r} needs more than {skip} block(s): the stack has "
                        f"{len(blocks)}, and the first {skip} always run")
    return blocks[skip:]


def plan_signal(graph: fx.Graph, blocks: list[Block], early_signal: str) -> list[MetricSite]:
    """The signal site(s) of ``early_signal``, outside every region."""
    cached_blocks(blocks, early_signal)
    pos = positions(graph)
    block = blocks[0]
    streams, _ = pair_streams(block.nodes, pos)
    if not streams:
        raise PassError(f"the first block {block.path} has no residual stream: no early signal to read")
    stream = primary_stream(streams, graph, [], pos)
    value = modulated_input(block, stream.inp, pos) if early_signal == "modulated_input" else None
    return [MetricSite(block, None, value, stream)]


def modulated_input(block: Block, stream_input: fx.Node, pos: dict[fx.Node, int]) -> fx.Node:
    """The input of the first linear layer of ``block`` that depends on ``stream_input`` (the adaLN
    modulation of the timestep embedding, which does not, is passed over)."""
    for node in block.nodes:
        if node.target in LINEAR_OPS:
            x = node.args[0] if node.target is not aten.addmm.default else node.args[1]
            if isinstance(x, fx.Node) and (x is stream_input or depends_on(x, stream_input, pos)):
                return x
    raise PassError(f"the first block {block.path} has no linear layer reading its stream: no modulated "
                    "input to read")
