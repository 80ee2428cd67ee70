"""Per-video decisions in a batch (``batch_decisions="per_sample"``): what ``insert_cache`` adds.

Each batch row has its own policy state (shape ``[B]``), metric, caches and history row; the step
counter and N stay shared (a batch steps together). The policy's tensor code runs unchanged on ``[B]``
state, as :mod:`~adacache_fx.policies.replay` runs it on ``[runs]``. The region computes when any row
needs it (the ``torch.cond`` predicate is ``compute.any()``); inside the compute branch a row that
would reuse takes ``stream_in + its cached residual`` and keeps its caches, metric memory and state,
so every row computes and skips as that video alone would.

Matches: the batch, dimension 0 of every stream, value, metric residual and early signal (refused,
with the reason, when one differs, or with a forecast, whose weights are not per-row yet). Every metric
part is measured on each row alone (:class:`RowMeasure`; MoReg's motion on a batch of one), an early
signal is kept per row.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import PassError, fake

aten = torch.ops.aten


def batch_size(ctx) -> int | None:
    """B for ``batch_decisions="per_sample"`` (None when decisions are shared); refuses what it cannot do."""
    config = ctx.config
    if getattr(config, "batch_decisions", "shared") != "per_sample":
        return None
    if ctx.forecast.order >= 1:
        raise PassError("batch_decisions='per_sample' does not take a forecast (extrapolation_order >= 1) yet")
    values = [s.out for r in ctx.regions for s in r.streams] + [v for r in ctx.regions for v in r.values]
    values += [site.value if site.value is not None else site.stream.out for site in ctx.sites]
    shapes = [tuple(fake(v).shape) for v in values]
    batch = shapes[0][0] if shapes and shapes[0] else None
    odd = [s for s in shapes if not s or s[0] != batch]
    if batch is None or odd:
        raise PassError(f"batch_decisions='per_sample' needs the batch as dimension 0 of every cached value; "
                        f"shapes {sorted(set(str(s) for s in shapes))}")
    if isinstance(batch, torch.SymInt):
        raise PassError("batch_decisions='per_sample' needs a static batch size (its state has a row per video), "
                        f"and dynamic_shapes makes it symbolic ({batch}): leave the batch dimension out of "
                        "dynamic_shapes (one capture per batch size; frames, height and width can stay dynamic)")
    latents = [fake(n) for n in ctx.graph.nodes if n.op == "placeholder" and fake(n) is not None
               and fake(n).is_floating_point() and fake(n).dim() >= 3][:1]
    if latents and latents[0].shape[0] != batch:
        raise PassError(f"batch_decisions='per_sample': the cached values' dimension 0 ({batch}) is not the batch "
                        f"of the first latent-like input ({latents[0].shape[0]}): the rows would not be videos")
    return batch


def per_row(spec_shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    """A policy state tensor's shape with a row per video (a scalar becomes ``[B]``)."""
    return (batch, *spec_shape)


def mix(graph: fx.Graph, mask: fx.Node, computed: fx.Node, kept: fx.Node, ndim: int) -> fx.Node:
    """Row ``b`` of ``computed`` where ``mask[b]``, else of ``kept`` (both ``[B, ...]`` of ``ndim`` dims)."""
    rows = graph.call_function(aten.view.default, (mask, [-1] + [1] * (ndim - 1)))
    return graph.call_function(aten.where.self, (rows, computed, kept))


class RowMeasure(torch.nn.Module):
    """The policy's ``measure`` on each batch row alone: parts ``[B, P]``."""

    def __init__(self, policy, batch: int):
        super().__init__()
        self.policy, self.batch = policy, batch

    def forward(self, site, p, p_prev):
        return torch.stack([self.policy.measure(site, p[b : b + 1], p_prev[b : b + 1]) for b in range(self.batch)])
