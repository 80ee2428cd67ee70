"""find_streams: pair the values leaving a group of nodes with the token streams that entered it, and
tell which stream carries the latent tokens (structurally, not by size).

Matches, for every live-out of the group, the live-in it is a residual update of: first by walking
``stream = stream + f(stream)`` back through residual adds, casts and same-shape views; failing that,
the live-in of the same shape and dtype that it depends on (unique, or the same rank in order when
several streams share a shape, as when a block concatenates and re-splits its streams).
Rewrites nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph_utils import (
    CONV_OPS,
    depends_on,
    fake,
    live_ins,
    live_outs,
    positions,
    residual_chain,
    same_tensor_type,
)

aten = torch.ops.aten


@dataclass
class Stream:
    """A token stream through a group of nodes: ``out = inp + residual``."""

    inp: fx.Node
    out: fx.Node
    adds: list  # residual adds on the way, (add, stream_operand, branch_operand) in execution order
    complete: bool = True  # the walk reached ``inp``: ``out`` is ``inp`` plus exactly these branches


def pair_streams(nodes: list[fx.Node], pos: dict[fx.Node, int] | None = None):
    """Return ``(streams, unpaired)``: the paired live-outs and the live-outs with no stream input."""
    if pos is None:
        pos = positions(nodes[0].graph)
    inside = set(nodes)
    outs = live_outs(nodes)
    ins = [n for n in live_ins(nodes) if n.op != "get_attr" and fake(n) is not None]
    streams, unpaired, pending = [], [], []
    for out in outs:
        origin, adds = residual_chain(out, inside, pos)
        if origin is not None and origin in ins and same_tensor_type(origin, out):
            streams.append(Stream(origin, out, adds))
        else:
            pending.append((out, adds))
    taken = {s.inp for s in streams}
    for out, adds in pending:
        candidates = [i for i in ins if i not in taken and same_tensor_type(i, out) and depends_on(out, i, pos)]
        if not candidates:
            unpaired.append(out)
            continue
        streams.append(Stream(candidates[0], out, adds, complete=False))
        taken.add(candidates[0])
    streams.sort(key=lambda s: pos[s.out])
    return streams, unpaired


def latent_input(graph: fx.Graph) -> fx.Node | None:
    """The latent input: the graph input the first convolution (a patch embedding) reads, else the
    first tensor input (diffusers transformers take ``hidden_states`` first)."""
    inputs = [n for n in graph.nodes if n.op == "placeholder" and fake(n) is not None and fake(n).dim() > 0]
    for node in graph.nodes:
        if node.op == "call_function" and node.target in CONV_OPS:
            found = [n for n in inputs if n in token_sources(node.args[0], {})]
            if len(found) == 1:
                return found[0]
            break
    return inputs[0] if inputs else None


def _slice_span(node: fx.Node, span):
    """The token span of a slice's input that ``span`` of its output comes from (None: not a plain slice)."""
    out, src = fake(node), fake(node.args[0])
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1:]
    dim, start, step = args[1] % out.dim(), args[2] or 0, args[4]
    if step != 1 or not isinstance(start, int):
        return None
    start = max(start + src.shape[dim], 0) if start < 0 else min(start, src.shape[dim])
    if span is None or span[0] != dim:
        return (dim, start, start + out.shape[dim]) if span is None else span
    return dim, start + span[1], start + span[2]


def token_sources(node: fx.Node, jumps: dict[fx.Node, fx.Node]) -> set[fx.Node]:
    """The graph inputs whose tokens reach ``node``.

    Walks back over the graph; ``jumps`` maps a block's stream output to its stream input (so the walk
    follows a stream through the blocks, not the attention that mixes streams); through a slice of a
    concatenation (also under ops that keep the token count, like adding a positional embedding) it
    follows only the concatenated parts the slice keeps.
    """
    found, seen, stack = set(), set(), [(node, None)]  # span: (dim, start, end) of the tokens followed
    while stack:
        item = stack.pop()
        if item in seen:
            continue
        seen.add(item)
        current, span = item
        if current.op == "placeholder":
            found.add(current)
            continue
        if current.op != "call_function":
            continue
        if current in jumps:
            stack.append((jumps[current], span))
            continue
        out = fake(current)
        if current.target is aten.slice.Tensor and out is not None and fake(current.args[0]) is not None:
            narrowed = _slice_span(current, span)
            if narrowed is not None:
                stack.append((current.args[0], narrowed))
                continue
        if current.target is aten.cat.default and span is not None and out is not None:
            dim = (current.args[1] if len(current.args) > 1 else 0) % out.dim()
            if dim == span[0]:
                offset = 0
                for part in current.args[0]:
                    size = fake(part).shape[dim]
                    if offset < span[2] and span[1] < offset + size:
                        stack.append((part, (dim, max(span[1] - offset, 0), min(span[2] - offset, size))))
                    offset += size
                continue
        for arg in current.all_input_nodes:
            value = fake(arg)
            keep = span is not None and value is not None and value.dim() == out.dim() and (
                value.shape[span[0]] == out.shape[span[0]])
            stack.append((arg, span if keep else None))
    return found


def primary_stream(streams: list[Stream], graph: fx.Graph | None = None, earlier_blocks=(), pos=None) -> Stream:
    """The stream of the latent tokens: the one whose tokens come from the latent input (see
    :func:`latent_input`), followed back through ``earlier_blocks`` (the blocks before this one). Among
    several (or none), the one carrying the most elements."""
    if len(streams) == 1 or graph is None:
        return max(streams, key=lambda s: (fake(s.out).numel(), -streams.index(s)))
    latent = latent_input(graph)
    jumps = {}
    for block in earlier_blocks:
        for stream in pair_streams(block.nodes, pos)[0]:
            jumps[stream.out] = stream.inp
    from_latent = [latent in token_sources(s.inp, jumps) for s in streams]
    return max(streams, key=lambda s: (from_latent[streams.index(s)], fake(s.out).numel(), -streams.index(s)))
