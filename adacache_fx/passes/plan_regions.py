"""plan_regions: choose the regions that a cached step skips (the metric sites: :mod:`.plan_metric`).

A region is a run of consecutive blocks plus the glue between them that depends on them. Every value
it hands to the rest of the graph must be a stream update ``out = inp + residual`` (see
:mod:`find_streams`), so that a cached step can produce ``inp + cached_residual``. The stack is tried as
one region; where a value leaving it is not such an update (a reshape between interleaved spatial
and temporal blocks, a concatenation of two streams), the run is split at the glue between blocks,
then into single blocks. A region's operands are tensors: a symbolic size it reads from outside (a
dynamic capture's ``sym_size`` arithmetic, e.g. the video token count where joint blocks split the
sequence) is recomputed in its compute branch from the tensor it was read from. Rewrites nothing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .find_blocks import Block
from .find_streams import Stream, pair_streams
from .graph_utils import PassError, fake, live_ins, passthrough_source, positions
from .hoist_buffer_writes import written_buffer


@dataclass
class Region:
    blocks: list[Block]
    nodes: list[fx.Node] = field(repr=False)
    inputs: list[fx.Node] = field(repr=False)  # tensor live-ins, parameters excluded
    streams: list[Stream] = field(repr=False)
    values: list[fx.Node] = field(default_factory=list, repr=False)  # outputs cached as values (branches)
    #: Nodes outside the region computing the symbolic sizes it reads (graph order); the compute branch
    #: recomputes them from the tensors in ``inputs`` (a ``torch.cond`` operand is a tensor).
    sizes: list[fx.Node] = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        first, last = self.blocks[0].path, self.blocks[-1].path
        return first if first == last else f"{first}..{last}"


@dataclass
class MetricSite:
    """Where the decision metric is read: a residual branch ``value`` (or ``out - inp``) of a block."""

    block: Block
    region: int | None  # None: an early-signal site, outside every region
    value: fx.Node | None
    stream: Stream


def region_nodes(blocks: list[Block], pos: dict[fx.Node, int]) -> list[fx.Node]:
    """The nodes a region over ``blocks`` runs: the blocks' nodes and the glue that depends on them."""
    graph_nodes = list(blocks[0].nodes[0].graph.nodes)
    start, end = pos[blocks[0].nodes[0]], pos[blocks[-1].nodes[-1]]
    in_block = {n for b in blocks for n in b.nodes}
    members: list[fx.Node] = []
    member_set: set[fx.Node] = set()
    for node in graph_nodes[start : end + 1]:
        if node.op != "call_function":
            continue
        inputs = node.all_input_nodes
        if node.target is operator.getitem and inputs and inputs[0] not in member_set:
            continue  # an item of an outside value is free: leave it outside
        if node in in_block or any(arg in member_set for arg in inputs):
            members.append(node)
            member_set.add(node)
    return members


def _size_nodes(node: fx.Node) -> set[fx.Node] | None:
    """The nodes computing the symbolic int ``node`` from tensors (``sym_size`` of an input and the
    arithmetic on it, as a dynamic-shape capture has them), or None when it is some other value."""
    found, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in found:
            continue
        if current.op != "call_function" or not isinstance(current.meta.get("val"), (int, torch.SymInt)):
            return None
        found.add(current)
        stack.extend(arg for arg in current.all_input_nodes if fake(arg) is None)
    return found


def region_inputs(nodes: list[fx.Node], pos) -> tuple[list[fx.Node], list[fx.Node], list[fx.Node]]:
    """``(inputs, sizes, bad)`` of a region over ``nodes``: its tensor live-ins (parameters excluded) plus
    the tensors its symbolic-size live-ins are computed from; the nodes computing those sizes (graph
    order); the live-ins that are neither tensors nor such sizes."""
    inputs, sizes, bad = [], set(), []
    for node in live_ins(nodes):
        if node.op == "get_attr":
            continue
        if fake(node) is not None:
            inputs.append(node)
        elif (found := _size_nodes(node)) is not None:
            sizes |= found
        else:
            bad.append(node)
    roots = sorted({a for n in sizes for a in n.all_input_nodes if fake(a) is not None}, key=pos.__getitem__)
    inputs += [r for r in roots if r not in inputs]
    return inputs, sorted(sizes, key=pos.__getitem__), bad


def _build(blocks: list[Block], pos) -> tuple[Region | None, list[fx.Node]]:
    nodes = region_nodes(blocks, pos)
    streams, unpaired = pair_streams(nodes, pos)
    if unpaired:
        return None, unpaired
    inputs, sizes, bad = region_inputs(nodes, pos)
    if bad:
        raise PassError(
            f"region {blocks[0].path}..{blocks[-1].path} takes non-tensor values from outside: "
            f"{[n.name for n in bad]}; it cannot become a conditional subgraph"
        )
    return Region(blocks, nodes, inputs, streams, sizes=sizes), []


def _split_runs(blocks: list[Block], pos) -> list[list[Block]]:
    """Split at glue: between two blocks whose nodes are not adjacent in the graph."""
    runs = [[blocks[0]]]
    graph_nodes = list(blocks[0].nodes[0].graph.nodes)
    for prev, block in zip(blocks, blocks[1:]):
        between = graph_nodes[pos[prev.nodes[-1]] + 1 : pos[block.nodes[0]]]
        if any(n.op == "call_function" for n in between):
            runs.append([block])
        else:
            runs[-1].append(block)
    return runs


def branch_nodes(block_nodes: set[fx.Node], stream_value: fx.Node, branch: fx.Node, pos) -> list[fx.Node]:
    """The nodes computing one residual branch ``f`` of ``stream = stream + f``.

    Matches the block's nodes after the stream value and up to ``branch`` that ``branch`` depends on;
    drops, to a fixpoint, every node also used outside (adaLN modulation shared by several branches),
    which then stays in the main graph and enters the region as an input.
    """
    source = passthrough_source(stream_value)  # the stream before any cast made just for the add
    floor, top = pos[source] if source in block_nodes else -1, pos[branch]
    needed, stack = {branch}, [branch]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in needed and arg.op == "call_function" and floor < pos[arg] <= top and arg in block_nodes:
                needed.add(arg)
                stack.append(arg)
    def sinks():  # value-less nodes (runtime asserts) reading only branch nodes go with the branch
        return {u for n in needed for u in n.users if not u.users and u.op == "call_function"
                and floor < pos[u] <= top and all(a in needed for a in u.all_input_nodes)}

    changed = True
    while changed:
        changed = False
        inside = needed | sinks()
        for node in list(needed):
            if node is not branch and any(user not in inside for user in node.users):
                needed.discard(node)
                changed = True
    needed |= sinks()
    for node in list(needed):  # an item of an outside value is free: leave it outside
        if node.target is operator.getitem and node.all_input_nodes[0] not in needed and node is not branch:
            needed.discard(node)
    return sorted(needed, key=pos.__getitem__)


def _branch_regions(block: Block, pos) -> list[Region]:
    streams, unpaired = pair_streams(block.nodes, pos)
    if unpaired or not streams or not all(s.complete for s in streams):
        return []  # not a pure residual chain (e.g. post-norm): the block is cached whole
    members = set(block.nodes)
    regions = []
    for stream in streams:
        for _, stream_value, branch in stream.adds:
            nodes = branch_nodes(members, stream_value, branch, pos)
            inputs, sizes, bad = region_inputs(nodes, pos)
            if bad:
                continue
            regions.append(Region([block], nodes, inputs, [], [branch], sizes=sizes))
    regions.sort(key=lambda r: pos[r.values[0]])
    return regions


def plan_regions(graph: fx.Graph, blocks: list[Block], granularity: str = "stack") -> list[Region]:
    """Return the regions, in execution order, covering every block once (or each residual branch)."""
    pos = positions(graph)
    if granularity == "branch":
        regions = []
        for block in blocks:
            found = _branch_regions(block, pos)
            regions.extend(found if found else plan_regions(graph, [block], "block"))
        return regions
    pending = [blocks] if granularity == "stack" else [[b] for b in blocks]
    regions = []
    while pending:
        run = pending.pop(0)
        region, unpaired = _build(run, pos)
        if region is not None:
            regions.append(region)
            continue
        if len(run) == 1:
            written = {n.name: written_buffer(n) for n in unpaired if written_buffer(n) is not None}
            if written:
                raise PassError(
                    f"block {run[0].path} writes the buffers {sorted(set(written.values()))} from values it computes "
                    f"from the call's inputs ({sorted(written)}): a cached step would not write them, and the "
                    "next call would read stale values; it cannot be cached. What you can do: keep that state "
                    "outside the transformed call, or compute it from the model's own weights only"
                )
            shapes = [tuple(fake(n).shape) if fake(n) is not None else None for n in unpaired]
            raise PassError(
                f"block {run[0].path} hands on values that are not residual updates of a stream that "
                f"entered it: {[n.name for n in unpaired]} with shapes {shapes}; it cannot be cached"
            )
        runs = _split_runs(run, pos)
        pending[:0] = runs if len(runs) > 1 else [[b] for b in run]
    return regions


def run(ctx) -> str:
    """The stage: the regions over the blocks an early signal leaves cached (all of them, or those
    after the first block for FirstBlockCache)."""
    from .plan_signal import cached_blocks

    blocks = cached_blocks(ctx.blocks, ctx.needs.early_signal)
    ctx.regions = plan_regions(ctx.graph, blocks, ctx.config.granularity)
    return f"{len(ctx.regions)} regions ({ctx.config.granularity}): {[r.name for r in ctx.regions]}"
