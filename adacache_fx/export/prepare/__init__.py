"""Export preparation: rewrites of the cached graph that make it a valid ONNX Runtime program.

:func:`prepare` runs the pass modules of :data:`PIPELINE` in order over one :class:`ExportContext`,
each ``run(ctx) -> summary`` like the passes of :mod:`adacache_fx.passes`, on a copy of the
rewritten graph module (the :class:`~adacache_fx.CachedModel`'s own graph is left as it is). Every
rewrite computes the same values in torch; it changes only what the ONNX translation emits. Each pass
module keeps its work as a plain function over a graph module, which its tests call alone on a
captured graph; each walks the main graph and every ``torch.cond`` branch.

=================  =============================================  ==========================================
stage              matches                                        rewrites
=================  =============================================  ==========================================
``squeeze_dims``   ``squeeze(x, dim)`` / ``squeeze(x, dims)`` of  the dims not 1 dropped (the node erased if
                   a dimension that is statically not 1 (a no-op  none is left): ONNX's ``Squeeze`` refuses
                   in torch)                                      them
``where_dtypes``   ``masked_fill`` / ``where`` whose values have  the values cast to a type it implements
                   a dtype ONNX Runtime's ``Where`` lacks (bool,  (bool to uint8, bfloat16 to float32,
                   bfloat16, int16, uint16)                       int16/uint16 to int32) and back: exact
=================  =============================================  ==========================================
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch.fx as fx

from . import squeeze_dims, where_dtypes

__all__ = ["PIPELINE", "ExportContext", "copy_graph_module", "graph_modules", "prepare"]

logger = logging.getLogger("adacache_fx.export")

#: The stages, in order.
PIPELINE = (squeeze_dims, where_dtypes)


@dataclass
class ExportContext:
    """The graph module being prepared for export and each stage's summary (by stage name)."""

    graph_module: fx.GraphModule
    summaries: dict[str, str] = field(default_factory=dict)


def graph_modules(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """``gm`` and every graph module its graph reads with ``get_attr`` (``torch.cond`` branches), depth first."""
    yield gm
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            sub = _get_attr(gm, node.target)
            if isinstance(sub, fx.GraphModule):
                yield from graph_modules(sub)


def _get_attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part, None)
    return module


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose graphs (its own and its branches') can be rewritten without changing ``gm``'s;
    parameters and buffers are shared, not copied."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    for node in new.graph.nodes:
        if node.op == "get_attr":
            sub = _get_attr(gm, node.target)
            if isinstance(sub, fx.GraphModule):
                owner, _, name = node.target.rpartition(".")
                setattr(_get_attr(new, owner) if owner else new, name, copy_graph_module(sub))
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def stage_name(stage) -> str:
    return stage.__name__.rpartition(".")[2]


def prepare(gm: fx.GraphModule) -> ExportContext:
    """Run :data:`PIPELINE` over a copy of ``gm``; returns the context (``ctx.graph_module``: the copy)."""
    ctx = ExportContext(copy_graph_module(gm))
    for stage in PIPELINE:
        name = stage_name(stage)
        ctx.summaries[name] = stage.run(ctx)
        logger.debug("%s: %s", name, ctx.summaries[name])
    return ctx
