"""insert_signal: the early signal of the current step in the main graph (a part of ``insert_cache``).

Matches: the signal sites from :mod:`plan_signal` (``MetricSite.region`` is None).
Rewrites: a residual site (``value`` None): after the site's stream output, ``p = out - inp``. A value
site inside a cached block (the modulated input): a copy of ``value`` and of its ancestors inside the
block, inserted before it in the main graph, so ``p`` exists before the region's ``torch.cond`` (the
originals move into its compute branch). Then ``p``'s metric parts ``policy.measure(j, p, p_prev)`` (so
:meth:`Policy.decide` can read them); after the decision, the kept signal becomes
``where(compute, p, p_prev)`` (``remember_signal="compute"``) or ``p`` (``"every"``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import PassError, fake, is_view
from .plan_regions import MetricSite

aten = torch.ops.aten


def insert_parts(graph: fx.Graph, sites: list[tuple[int, MetricSite]], state: dict[str, fx.Node]):
    """Insert ``p`` and its metric parts for each ``(j, site)``; return ``(last node, ps, parts)``."""
    last, ps, parts = None, [], []
    for j, site in sites:
        if site.value is not None:
            p = copy_ancestry(graph, site)
        else:
            with graph.inserting_after(site.stream.out):
                p = graph.call_function(aten.sub.Tensor, (site.stream.out, site.stream.inp))
        with graph.inserting_after(p):
            part = graph.call_module("adacache_measure", (j, p, state[f"p_prev_{j}"]))
        ps.append(p)
        parts.append(part)
        last = part if last is None or _later(graph, part, last) else last
    return last, ps, parts


def copy_ancestry(graph: fx.Graph, site: MetricSite) -> fx.Node:
    """A copy of ``site.value`` computed in the main graph: its ancestors inside ``site.block`` copied,
    in graph order, right before it (their outside inputs all come earlier); a clone of it where it is
    the stream input itself. A view or a non-contiguous value is made contiguous (the kept signal is
    returned as state)."""
    inside = set(site.block.nodes)
    if site.value not in inside:  # the linear reads the stream input itself: already in the main graph
        with graph.inserting_after(site.value):
            return graph.call_function(aten.clone.default, (site.value,), {"memory_format": torch.contiguous_format})
    ancestry, stack = {site.value}, [site.value]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg in inside and arg not in ancestry:
                ancestry.add(arg)
                stack.append(arg)
    written = _in_place_writers(ancestry)
    if written:
        raise PassError(f"the early signal {site.value.name} of {site.block.path} is written in place by "
                        f"{[n.name for n in written]}: capture the model functionalized to read it")
    env: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(site.value):
        for node in site.block.nodes:
            if node in ancestry:
                env[node] = graph.node_copy(node, lambda arg: env.get(arg, arg))
                env[node].meta.pop("nn_module_stack", None)  # not a node of the block any more
        p = env[site.value]
        meta = fake(site.value)
        if is_view(site.value) or meta is None or not meta.is_contiguous():
            p = graph.call_function(aten.clone.default, (p,), {"memory_format": torch.contiguous_format})
    return p


def _in_place_writers(nodes: set[fx.Node]) -> list[fx.Node]:
    """The in-place ops that write one of ``nodes`` or a view of one (their first argument)."""
    found, seen, stack = [], set(nodes), list(nodes)
    while stack:
        node = stack.pop()
        for user in node.users:
            schema = getattr(user.target, "_schema", None)
            if schema is not None and schema.is_mutable and user.args and user.args[0] is node:
                found.append(user)
            elif is_view(user) and user not in seen:
                seen.add(user)
                stack.append(user)
    return found


def remember(graph: fx.Graph, anchor: fx.Node, compute: fx.Node, ps: list[fx.Node], previous: list[fx.Node],
             when: str, ndims: list[int] | None = None) -> list[fx.Node]:
    """The kept signals after this step, inserted after ``anchor``; ``ndims``: the signals' dimensions
    when ``compute`` holds a decision per batch row (per-sample decisions)."""
    if when == "every":
        return list(ps)
    if when != "compute":
        raise ValueError(f"remember_signal must be 'compute' or 'every', got {when!r}")
    kept = []
    for k, (p, prev) in enumerate(zip(ps, previous)):
        mask = compute
        if ndims is not None:  # a decision per batch row: broadcast over its row of the signal
            with graph.inserting_after(anchor):
                mask = anchor = graph.call_function(aten.view.default, (compute, [-1] + [1] * (ndims[k] - 1)))
        with graph.inserting_after(anchor):
            anchor = graph.call_function(aten.where.self, (mask, p, prev))
        kept.append(anchor)
    return kept


def _later(graph: fx.Graph, a: fx.Node, b: fx.Node) -> bool:
    for node in graph.nodes:
        if node is b:
            return True
        if node is a:
            return False
    return False
