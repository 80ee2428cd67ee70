"""find_streams: pair the values leaving a group of nodes with the token streams that entered it.

Matches, for every live-out of the group, the live-in it is a residual update of: first by walking
``stream = stream + f(stream)`` back through residual adds, casts and same-shape views; failing that,
the live-in of the same shape and dtype that it depends on (unique, or the same rank in order when
several streams share a shape, as when a block concatenates and re-splits its streams).
Rewrites nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .graph_utils import depends_on, fake, live_ins, live_outs, positions, residual_chain, same_tensor_type


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


def primary_stream(streams: list[Stream]) -> Stream:
    """The stream carrying the most elements (the video tokens in a two-stream block)."""
    return max(streams, key=lambda s: (fake(s.out).numel(), -streams.index(s)))
