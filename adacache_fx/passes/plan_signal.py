"""plan_signal: where a policy with an early signal (:attr:`Policy.early_signal`) reads it.

Matches, for ``early_signal="first_block"``, the first block of the stack and its latent stream
(:func:`~.find_streams.primary_stream`). Returns the signal as metric site 0: the block's residual
``out - inp`` on that stream, read in the main graph (``MetricSite.region`` is None). The regions are then
planned over the blocks after it (:func:`cached_blocks`), so the first block runs on every step.
Rewrites nothing.
"""

from __future__ import annotations

import torch.fx as fx

from .find_blocks import Block
from .find_streams import pair_streams, primary_stream
from .graph_utils import PassError, positions
from .plan_regions import MetricSite

#: The early signals the passes can read, and how many leading blocks each leaves uncached.
SIGNALS = {"first_block": 1}


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
    return [MetricSite(block, None, None, primary_stream(streams, graph, [], pos))]
