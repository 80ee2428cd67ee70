"""insert_signal: the early signal of the current step in the main graph (a part of ``insert_cache``).

Matches: the signal sites from :mod:`plan_signal` (``MetricSite.region`` is None).
Rewrites: after the site's stream output, ``p = out - inp`` and its metric parts
``policy.measure(j, p, p_prev)`` (so :meth:`Policy.decide` can read them); after the decision, the kept
signal becomes ``where(compute, p, p_prev)`` (``remember_signal="compute"``) or ``p`` (``"every"``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .plan_regions import MetricSite

aten = torch.ops.aten


def insert_parts(graph: fx.Graph, sites: list[tuple[int, MetricSite]], state: dict[str, fx.Node]):
    """Insert ``p`` and its metric parts for each ``(j, site)``; return ``(last node, ps, parts)``."""
    last, ps, parts = None, [], []
    for j, site in sites:
        with graph.inserting_after(site.stream.out):
            p = graph.call_function(aten.sub.Tensor, (site.stream.out, site.stream.inp))
        with graph.inserting_after(p):
            part = graph.call_module("adacache_measure", (j, p, state[f"p_prev_{j}"]))
        ps.append(p)
        parts.append(part)
        last = part if last is None or _later(graph, part, last) else last
    return last, ps, parts


def remember(graph: fx.Graph, anchor: fx.Node, compute: fx.Node, ps: list[fx.Node], previous: list[fx.Node],
             when: str) -> list[fx.Node]:
    """The kept signals after this step, inserted after ``anchor``."""
    if when == "every":
        return list(ps)
    if when != "compute":
        raise ValueError(f"remember_signal must be 'compute' or 'every', got {when!r}")
    with graph.inserting_after(anchor):
        return [graph.call_function(aten.where.self, (compute, p, prev)) for p, prev in zip(ps, previous)]


def _later(graph: fx.Graph, a: fx.Node, b: fx.Node) -> bool:
    for node in graph.nodes:
        if node is b:
            return True
        if node is a:
            return False
    return False
