"""reduce_metric: sum the metric parts over the context-parallel group, so every rank decides alike.

Matches: a graph that runs under context parallelism, i.e. it (or one of its ``torch.cond`` branches)
holds ``_c10d_functional`` collectives, or the caller names the process group. Each rank then holds a
shard of the sequence, and the metric parts :meth:`~adacache_fx.policies.base.Policy.measure` returns
are sums over that shard.

Rewrites: the parts handed to the policy's ``update`` (found in ``ctx.calls``) into
``split(wait_tensor(all_reduce(cat(parts), "sum", group)))``: one functional all-reduce per step, in the
main graph (computed and cached steps alike, so every rank issues the same collectives), before the
policy turns the parts into the next schedule. A policy with an early signal (FirstBlockCache) reads
this step's signal parts in ``adacache_decide``: those are reduced the same way right before the
decision (in the main graph, on every step), and ``adacache_update`` receives the reduced ones (never
reduced twice). With ``forecast_gain="fit"`` the two sums the gain is fitted from travel in the same
all-reduce as the metric parts. The metric then equals the single-process one up to
float rounding, and every rank takes the same branch of every ``torch.cond`` without a host sync.

A graph whose collectives come from tensor parallelism (the sequence whole on every rank, the metric
residual replicated) is reduced too: every part is then multiplied by the group size, and the metric,
a ratio of parts, does not change.

MoReg's motion parts compare frames ``i`` apart: each rank sums the pairs whose later element it holds,
taking the earlier ones from the ranks before it with one functional all-gather of their last ``i``
frames' worth of elements, in the compute branch (:class:`~adacache_fx.policies.adacache.MotionMagnitude`,
laid out by the ``frame_layout`` stage); summed here, they are the single-process parts.
"""

from __future__ import annotations

import operator

import torch
import torch.distributed as dist
import torch.fx as fx

from .graph_utils import PassError

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

def collectives(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``_c10d_functional`` collective nodes (``wait_tensor`` aside) of ``gm`` and its submodules."""
    found = []
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            found += [n for n in module.graph.nodes if n.op == "call_function" and _group_arg(n) is not None]
    return found


def _group_arg(node: fx.Node) -> str | None:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "_c10d_functional":
        return None
    names = [arg.name for arg in target._schema.arguments]
    if "group_name" not in names:
        return None
    index = names.index("group_name")
    return node.args[index] if index < len(node.args) else node.kwargs.get("group_name")


def group_name(gm: fx.GraphModule, group=None) -> str | None:
    """The name of the group to reduce over: ``group`` (a ProcessGroup or its name), else the one group
    the graph's collectives use; None when the graph holds no collective (a single-process run)."""
    if group is not None:
        return group if isinstance(group, str) else group.group_name
    names = sorted({_group_arg(n) for n in collectives(gm)})
    if len(names) > 1:
        raise PassError(
            f"the graph's collectives use several process groups {names}; pass the context-parallel group "
            "(diffusers models: it is read from the model's parallel config)"
        )
    return names[0] if names else None


def reduce_metric(ctx) -> int:
    """Insert the all-reduce(s) of the metric parts; return how many collectives were added per step.

    An early signal's parts (``decide``'s fourth argument, ``ctx.calls.signal_sites``) are reduced right
    before the decision, and ``update`` receives the reduced ones; the parts of the metric sites inside
    regions, if any, are reduced before ``update``, with the forecast gain's sums if fitted. Each is one
    all-reduce in the main graph."""
    gm = ctx.graph_module
    name = group_name(gm, ctx.process_group)
    if name is None:
        return 0
    if not dist.is_available() or not dist.is_initialized():
        raise PassError(
            "the model runs under context parallelism (collectives in its graph) but torch.distributed is "
            "not initialized: call torch.distributed.init_process_group() first (torchrun sets up the ranks)"
        )
    graph, policy, calls = gm.graph, ctx.policy, ctx.calls
    decide, update, gain = calls.decide, calls.update, calls.gain
    s, compute, parts, *rest = update.args
    parts, added, todo = list(parts), 0, list(range(len(parts)))  # site j's parts, the sites left to reduce
    if calls.signal_sites:  # the decision reads this step's parts: reduce them first
        step, num_steps, state, signal, *more = decide.args
        sites = calls.signal_sites
        with graph.inserting_before(decide):
            reduced = _all_reduce(graph, list(signal), [policy.num_parts(j) for j in sites], name)
        decide.args = (step, num_steps, state, reduced, *more)
        for j, part in zip(sites, reduced):
            parts[j] = part
        todo = [j for j in todo if j not in sites]
        added += 1
    # forecast_gain="fit": the gain's two sums are over this rank's tokens too (reduced with the parts)
    sums = [gain.args[0]] if gain is not None else []
    if todo or sums:
        with graph.inserting_before(gain if gain is not None else update):
            reduced = _all_reduce(graph, [parts[j] for j in todo] + sums,
                                  [policy.num_parts(j) for j in todo] + [2] * len(sums), name)
        for j, part in zip(todo, reduced):
            parts[j] = part
        if gain is not None:
            gain.args = (reduced[-1], *gain.args[1:])
        added += 1
    update.args = (s, compute, parts, *rest)
    graph.lint()
    gm.recompile()
    return added


def run(ctx) -> str:
    added = reduce_metric(ctx)
    return f"{added} all-reduce(s) of the metric parts per step" if added else "no collectives: skipped"


def _all_reduce(graph: fx.Graph, parts: list[fx.Node], sizes: list[int], name: str) -> list[fx.Node]:
    """``split(wait_tensor(all_reduce(cat(parts), "sum", name)), sizes)``, at the insertion point."""
    flat = graph.call_function(aten.cat.default, (parts, -1))  # parts last ([B, P] with per-sample decisions)
    reduced = graph.call_function(c10d.all_reduce.default, (flat, "sum", name))
    reduced = graph.call_function(c10d.wait_tensor.default, (reduced,))
    split = graph.call_function(aten.split_with_sizes.default, (reduced, sizes, -1))
    return [graph.call_function(operator.getitem, (split, k)) for k in range(len(sizes))]
