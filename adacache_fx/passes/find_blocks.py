"""find_blocks: locate the transformer block stack in a captured graph.

Matches: nodes whose ``nn_module_stack`` contains a scope ``<list>.<i>`` (an indexed child of a
container that is never called itself, i.e. a ``ModuleList``), taking the outermost such scope so
that ``blocks.3.attn.to_out.0`` belongs to ``blocks.3``. Of all block lists, the ones closest to the
model root form the stack (a list nested in an embedder, like a text refiner, does not); several
lists at that depth (double- then single-stream blocks, interleaved spatial and temporal blocks) are
merged in execution order. A list none of whose blocks updates a stream (a ModuleList of projections,
one per text-encoder layer: no value leaving a block has the type of a value entering it) is not part
of the stack: it is left out, not refused.

Entry glue: a block whose residual stream starts at a value it computes from outside values without
any of its parameters (the split of a context-parallel plan whose hook sits on the first block, so
the rank's slice of the sequence is recorded in that block's scope) gets those nodes taken out of it:
they are glue before the block, and the slice is the stream that enters it. Rewrites nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.fx as fx

from .find_streams import pair_streams
from .graph_utils import PassError, live_outs, positions, residual_walk

logger = logging.getLogger("adacache_fx.passes")


@dataclass
class Block:
    """One block of the stack: its module path and the graph nodes it runs, in graph order."""

    index: int
    path: str
    nodes: list[fx.Node] = field(repr=False)


def block_scope(node: fx.Node) -> str | None:
    """The outermost indexed-child scope of a node (``"blocks.3"``), or None outside any block."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    paths = [entry[0] for entry in stack.values()]
    called = set(paths)
    for path in paths:
        parent, _, last = path.rpartition(".")
        if last.isdigit() and parent and parent not in called:
            return path
    return None


def find_blocks(graph: fx.Graph) -> list[Block]:
    """Return the blocks of the main stack in execution order.

    Raises :class:`PassError` if the graph has no block list, or if a block's nodes interleave with
    another block's (the region between two blocks must be glue, not another block).
    """
    spans: dict[str, list[int]] = {}
    order = list(graph.nodes)
    for i, node in enumerate(order):
        if node.op != "call_function":
            continue
        scope = block_scope(node)
        if scope is not None:
            span = spans.setdefault(scope, [i, i])
            span[1] = i
    if not spans:
        raise PassError(
            "no transformer block stack found: no node runs inside an indexed child of a module "
            "container (e.g. an nn.ModuleList of blocks)"
        )
    pos = positions(graph)
    nodes_of = {path: [n for n in order[start : end + 1] if n.op == "call_function"] for path, (start, end) in spans.items()}
    lists: dict[str, list[str]] = {}
    for path in spans:
        lists.setdefault(path.rpartition(".")[0], []).append(path)
    streamless = {parent for parent, paths in lists.items() if not any(_updates_a_stream(nodes_of[p], pos) for p in paths)}
    if streamless and len(streamless) < len(lists):
        logger.debug("left out of the block stack (no block updates a stream): %s", sorted(streamless))
        spans = {path: span for path, span in spans.items() if path.rpartition(".")[0] not in streamless}
    depth = min(path.count(".") for path in spans)
    stack = sorted(((s, path) for path, s in spans.items() if path.count(".") == depth))
    blocks = []
    for index, ((start, _), path) in enumerate(stack):
        if index and start <= stack[index - 1][0][1]:
            raise PassError(f"blocks {stack[index - 1][1]} and {path} interleave in the graph")
        blocks.append(Block(index, path, nodes_of[path]))
    for block in blocks:
        glue = entry_glue(block.nodes, pos)
        block.nodes = [n for n in block.nodes if n not in glue]
    return blocks


def _updates_a_stream(nodes: list[fx.Node], pos: dict[fx.Node, int]) -> bool:
    """Whether a value leaving these nodes updates a value that entered them (a residual stream)."""
    streams, _ = pair_streams(nodes, pos)
    return bool(streams)


def entry_glue(nodes: list[fx.Node], pos: dict[fx.Node, int]) -> set[fx.Node]:
    """The nodes of a block that only lay out, from outside values, the stream the block updates.

    For each value leaving the block, walk its residual chain back; if the walk met a residual add and
    stopped inside the block, the stop and its ancestors inside the block are glue when none of them
    reads a parameter (a split, slice or cast of an incoming value, not the block's own computation).
    """
    inside = set(nodes)
    glue: set[fx.Node] = set()
    for out in live_outs(nodes):
        stop, adds = residual_walk(out, inside, pos)
        if stop not in inside or not adds:
            continue
        ancestors, stack = {stop}, [stop]
        while stack:
            for arg in stack.pop().all_input_nodes:
                if arg in inside and arg not in ancestors:
                    ancestors.add(arg)
                    stack.append(arg)
        if not any(arg.op == "get_attr" for node in ancestors for arg in node.all_input_nodes):
            glue |= ancestors
    return glue


def run(ctx) -> str:
    ctx.blocks = find_blocks(ctx.graph)
    return f"{len(ctx.blocks)} blocks: {ctx.blocks[0].path} .. {ctx.blocks[-1].path}"
