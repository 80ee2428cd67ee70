"""insert_cache: rewrite each planned region into a ``torch.cond`` over compute and cached branches.

Matches: the regions from :mod:`plan_regions` and the metric sites from :mod:`plan_metric`.
Rewrites the graph into a pure function ``(inputs..., state...) -> (outputs..., new_state...)``::

    step, policy state ──decide──▶ s, compute                       (top of the graph)
    forecast weights (ctx.forecast)                                (top, when a cached step forecasts)
    region r:  outs = cond(compute, compute_branch_r, cached_branch_r, operands)
               compute: run the region; residuals out - inp; metric parts of its sites (policy.measure)
               cached:  inp + cache (or its forecast, see :mod:`~adacache_fx.policies.forecast`)
    s, metric parts, policy state ──update──▶ next state, history row  (bottom of the graph)

* state tensors become placeholders ``adacache_<name>`` after the user inputs, in the order of the
  returned :class:`~adacache_fx.state.StateLayout`;
* the policy is built here, once, from what the planning found (``ctx.policy``), and its calls are
  recorded in ``ctx.calls``; the row ``update`` names is written into the ``history`` state here;
* each cond's operands and outputs follow one :class:`~.branch_layout.BranchLayout`;
* on a cached step the region does not run at all;
* a policy with an early signal (FirstBlockCache, TeaCache) decides after it: the signal sites are
  measured in the main graph before ``decide`` (:mod:`.insert_signal`; a signal inside the first region,
  TeaCache's modulated input, is recomputed there from a copy of its ancestors);
* per-sample decisions (:mod:`.per_sample`): the policy state has a row per video, ``compute`` is
  ``[B]`` and the conds take ``compute.any()``; the compute branch takes the rows' mask (``row_mask``)
  and gives a row that reuses ``inp + cache``, its cache, metric memory and zero parts.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx

from ..policies import GraphFacts, PolicyCall, make_policy
from ..state import StateLayout, StateSpec
from .branch_layout import BranchLayout
from .context import PolicyNodes
from .graph_utils import COND, fake, is_view
from .insert_signal import insert_parts, remember
from .per_sample import RowMeasure, batch_size, mix, per_row
from .plan_regions import MetricSite, Region

aten = torch.ops.aten

STEP_STATE = (StateSpec("step", (), torch.int64, 0), StateSpec("num_steps", (), torch.int64, 0, returned=False))


def _after(graph: fx.Graph, node: fx.Node):
    """Insert new nodes right after ``node``, in creation order."""
    return graph.inserting_before(node.next)


def _getitems(graph: fx.Graph, node: fx.Node, keys) -> list[fx.Node]:
    with _after(graph, node):
        return [graph.call_function(operator.getitem, (node, key)) for key in keys]


def _fresh(graph: fx.Graph, value: fx.Node, original: fx.Node) -> fx.Node:
    """A branch output must be dense and contiguous, and alias no input nor other output: copy views
    and non-contiguous values (``original`` is the captured node whose metadata tells)."""
    meta = fake(original)
    if is_view(original) or meta is None or not meta.is_contiguous():
        return graph.call_function(aten.clone.default, (value,), {"memory_format": torch.contiguous_format})
    return value


def _dense(t: torch.Tensor) -> bool:
    """Its elements fill its storage once, in some order of its dimensions (a permuted layout)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _restore_layout(graph: fx.Graph, value: fx.Node, original: fx.Node) -> fx.Node:
    """``value`` (a region output, contiguous as branch outputs are) in the strides ``original`` had in
    the model, so the ops after the region see the layout they saw there and round as they did (a
    reduction over a transposed layout sums in another order: AceStep's RMSNorm after its stack)."""
    meta = fake(original)
    if meta is None or meta.is_contiguous() or not _dense(meta):
        return value
    with graph.inserting_after(value):
        empty = graph.call_function(aten.empty_strided.default, (list(meta.shape), list(meta.stride())),
                                    {"dtype": meta.dtype, "device": meta.device})
    with graph.inserting_after(empty):
        restored = graph.call_function(aten.copy.default, (empty, value))
    restored.meta = dict(original.meta)
    return restored


def _zero_parts(graph: fx.Graph, like: fx.Node, count: int, batch: int | None = None) -> fx.Node:
    shape = [count] if batch is None else [batch, count]
    return graph.call_function(aten.new_zeros.default, (like, shape), {"dtype": torch.float32})


def _clones(graph: fx.Graph, nodes: list[fx.Node]) -> list[fx.Node]:
    return [graph.call_function(aten.clone.default, (n,)) for n in nodes]


def _build_branches(gm, region: Region, sites: list[tuple[int, MetricSite]], layout: BranchLayout, policy,
                    forecast, batch: int | None = None) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Return ``(compute_gm, cached_gm)`` taking and returning ``layout``'s operands and outputs.

    ``sites``: ``(index, site)`` of the metric sites inside the region, ``index`` numbering all sites;
    ``batch``: B with per-sample decisions (a row that reuses keeps its cache inside the compute branch).
    """
    order = layout.order
    n_caches = len(region.streams) + len(region.values)
    compute, cached = fx.Graph(), fx.Graph()

    def placeholders(graph: fx.Graph) -> dict[str, list[fx.Node]]:
        names = layout.operands.pack(
            inputs=[node.name for node in region.inputs], caches=[f"cache_{k}" for k in range(n_caches)],
            previous_caches=[f"cache_prev_{k}" for k in range(n_caches)] if order >= 1 else [],
            older_caches=[f"cache_older_{k}" for k in range(n_caches)] if order >= 2 else [],
            weight=["w", "v"][:order], fit_weight=["fit_w", "fit_v"][:order] if layout.fit_gain else [],
            site_memory=[f"p_prev_{j}" for j, _ in sites],
            row_mask=["rows"] if batch is not None else [],
        )
        return layout.operands.unpack([graph.placeholder(name) for name in names])

    # compute: the region itself; it reads the caches only to hand them on as the previous ones
    ops = placeholders(compute)
    env: dict[fx.Node, fx.Node] = dict(zip(region.inputs, ops["inputs"]))
    for node in region.sizes:  # symbolic sizes from outside: recomputed from the tensor operands
        env[node] = compute.node_copy(node, lambda arg: env[arg])
    for node in region.nodes:
        for arg in node.all_input_nodes:
            if arg not in env and arg.op == "get_attr":
                env[arg] = compute.get_attr(arg.target)
        env[node] = compute.node_copy(node, lambda arg: env[arg])
    outs = [_fresh(compute, env[s.out], s.out) for s in region.streams]
    values = [_fresh(compute, env[v], v) for v in region.values]
    residuals = [compute.call_function(aten.sub.Tensor, (env[s.out], env[s.inp])) for s in region.streams]
    if batch is not None:  # rows that reuse: inp + their cache, the cache kept (as on a cached step)
        rows, n = ops["row_mask"][0], len(region.streams)
        ndims = [fake(s.out).dim() for s in region.streams] + [fake(v).dim() for v in region.values]
        reused = [compute.call_function(aten.add.Tensor, (env[s.inp], c)) for s, c in zip(region.streams, ops["caches"])]
        outs = [mix(compute, rows, o, r, d) for o, r, d in zip(outs, reused, ndims)]
        residuals = [mix(compute, rows, r, c, d) for r, c, d in zip(residuals, ops["caches"], ndims)]
        values = [mix(compute, rows, v, c, d) for v, c, d in zip(values, ops["caches"][n:], ndims[n:])]
    memory, parts = [], []
    for (j, site), p_prev in zip(sites, ops["site_memory"]):
        if site.value is not None:
            p = _fresh(compute, env[site.value], site.value)
            if any(p is other for other in outs + values):  # an output already: a second one must not alias it
                p = compute.call_function(aten.clone.default, (p,))
        else:
            p = compute.call_function(aten.sub.Tensor, (env[site.stream.out], env[site.stream.inp]))
        part = compute.call_module("adacache_measure", (j, p, p_prev))
        if batch is not None:  # a row that reuses measures nothing and keeps its memory
            ndim = fake(site.value if site.value is not None else site.stream.out).dim()
            p = mix(compute, rows, p, p_prev, ndim)
            part = mix(compute, rows, part, compute.call_function(aten.zeros_like.default, (part,)), 2)
        memory.append(p)
        parts.append(part)
    dtypes = [fake(v).dtype for v in [s.out for s in region.streams] + list(region.values)]
    gain_parts = []
    if layout.fit_gain:  # how well the forecast from the earlier compute steps predicts this step's
        keep = [k for k in range(n_caches) if dtypes[k].is_floating_point]
        new, older = residuals + values, ops["older_caches"] or [None] * n_caches
        gain_parts = [forecast.gain_parts(compute, *([group[k] for k in keep] for group in (
            new, ops["caches"], ops["previous_caches"], older)), ops["fit_weight"])]
    compute.output(tuple(layout.outputs.pack(
        streams=outs, values=values, residuals=residuals,
        # a forecast value is not its own cache: keep the computed one apart
        value_caches=_clones(compute, values) if order >= 1 else [],
        previous_caches=_clones(compute, ops["caches"]) if order >= 1 else [],
        older_caches=_clones(compute, ops["previous_caches"]) if order >= 2 else [],
        site_memory=memory, metric_parts=parts, gain_parts=gain_parts,
    )))

    # cached: inp + the (forecast) residual, the caches handed on unchanged, no metric
    ops = placeholders(cached)
    stream_in = dict(zip(region.inputs, ops["inputs"]))
    previous = ops["previous_caches"] or [None] * n_caches
    older = ops["older_caches"] or [None] * n_caches
    reused = [forecast.reuse(cached, c, p, o, ops["weight"], dtype)
              for c, p, o, dtype in zip(ops["caches"], previous, older, dtypes)]
    n = len(region.streams)
    like = ops["caches"][0]
    cached.output(tuple(layout.outputs.pack(
        streams=[cached.call_function(aten.add.Tensor, (stream_in[s.inp], reused[k]))
                 for k, s in enumerate(region.streams)],
        values=[cached.call_function(aten.clone.default, (v,)) if v is c else v
                for v, c in zip(reused[n:], ops["caches"][n:])],
        residuals=_clones(cached, ops["caches"][:n]),
        value_caches=_clones(cached, ops["caches"][n:]) if order >= 1 else [],
        previous_caches=_clones(cached, ops["previous_caches"]),
        older_caches=_clones(cached, ops["older_caches"]),
        site_memory=_clones(cached, ops["site_memory"]),
        metric_parts=[_zero_parts(cached, like, policy.num_parts(j), batch) for j, _ in sites],
        gain_parts=[_zero_parts(cached, like, 2)] if layout.fit_gain else [],
    )))

    compute_gm = fx.GraphModule(gm, compute, class_name="ComputeBranch")
    cached_gm = fx.GraphModule(torch.nn.Module(), cached, class_name="CachedBranch")
    return compute_gm, cached_gm


def state_shape(value) -> tuple[int | str, ...]:
    """A state tensor's shape: ints, or expressions of the symbolic input sizes (a dynamic-shape capture)."""
    return tuple(d if isinstance(d, int) else str(d.node.expr) for d in value.shape)


def _state_specs(policy, forecast, regions: list[Region], sites: list[MetricSite],
                 batch: int | None = None) -> list[StateSpec]:
    history = StateSpec("history", None, torch.float32, float("nan"), columns=tuple(policy.history_columns),
                        checked=policy.checked_column, batch=batch)
    policy_specs = list(policy.state_specs())
    if batch is not None:  # a row of policy state per video
        policy_specs = [replace(spec, shape=per_row(spec.shape, batch)) for spec in policy_specs]
    specs = [*STEP_STATE, *policy_specs, history]
    for j, site in enumerate(sites):
        value = fake(site.value if site.value is not None else site.stream.out)
        specs.append(StateSpec(f"p_prev_{j}", state_shape(value), value.dtype, 0.0, cache=True))
    specs += forecast.state_specs()
    for r, region in enumerate(regions):
        for k, value in enumerate([s.out for s in region.streams] + list(region.values)):
            value = fake(value)
            for kind in ("", *forecast.history):  # the last compute step's, and those a forecast keeps
                name = f"cache_{kind}_{r}_{k}" if kind else f"cache_{r}_{k}"
                specs.append(StateSpec(name, state_shape(value), value.dtype, 0.0, cache=True))
    return specs


class HistoryRow(torch.nn.Module):
    """``history`` with row ``s - 1`` set to ``[computed, *row[name] for name in columns]`` (float32)."""

    def __init__(self, columns: tuple[str, ...]):
        super().__init__()
        self.columns = tuple(columns)

    def forward(self, history, s, compute, row):
        columns = torch.broadcast_tensors(compute.to(torch.float32), *(row[name].to(torch.float32) for name in self.columns))
        values = torch.stack(columns, dim=-1)  # [columns], or [B, columns] with per-sample decisions
        return history.index_copy(0, (s - 1).reshape(1), values.unsqueeze(0))


def insert_cache(ctx) -> tuple[StateLayout, list[BranchLayout]]:
    """Rewrite ``ctx.graph_module`` in place (see the module docstring); set ``ctx.policy`` and
    ``ctx.calls``; return its state layout and each region's branch layout."""
    gm, graph, regions, sites = ctx.graph_module, ctx.graph, ctx.regions, ctx.sites
    forecast = ctx.forecast
    batch = batch_size(ctx)
    frames = ctx.frame_layout
    if batch is not None and frames is not None:  # each row's motion measured alone (RowMeasure)
        frames = (1, frames[1])
    policy = ctx.policy = make_policy(ctx.config, GraphFacts(len(sites), frames, ctx.shard))
    specs = _state_specs(policy, forecast, regions, sites, batch)
    policy_names = [spec.name for spec in policy.state_specs()]

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    state: dict[str, fx.Node] = {}
    with _after(graph, placeholders[-1]):
        for spec in specs:
            state[spec.name] = graph.placeholder(f"adacache_{spec.name}")

    gm.add_submodule("adacache_policy", policy)
    for method in ("decide", "measure", "update"):
        gm.add_submodule(f"adacache_{method}", PolicyCall(policy, method))
    if batch is not None:
        gm.add_submodule("adacache_measure", RowMeasure(policy, batch))
    decide_args = (state["step"], state["num_steps"], {name: state[name] for name in policy_names})
    anchor = state[specs[-1].name]
    early = [(j, site) for j, site in enumerate(sites) if site.region is None]  # the early signal's sites
    if early:  # decide after the signal of this step (see insert_signal)
        anchor, signal_ps, signal_parts = insert_parts(graph, early, state)
        decide_args += (signal_parts,)
    with _after(graph, anchor):
        decide = graph.call_module("adacache_decide", decide_args)
    s, compute, decided = _getitems(graph, decide, range(3))
    policy_state = dict(zip(policy_names, _getitems(graph, decided, policy_names)))
    predicate = compute
    if batch is not None:  # each row's decision; the regions compute when any row does
        with _after(graph, compute):
            compute = graph.call_function(aten.expand.default, (compute, [batch]))
            predicate = graph.call_function(aten.any.default, (compute,))
    new_state: dict[str, fx.Node] = {"step": s}
    parts: dict[int, fx.Node] = {}  # metric parts by site index
    if early:
        ndims = None if batch is None else [len(spec.shape) for spec in specs
                                            for j, _ in early if spec.name == f"p_prev_{j}"]
        kept = remember(graph, decided, compute, signal_ps, [state[f"p_prev_{j}"] for j, _ in early],
                        ctx.needs.remember_signal, ndims)
        for (j, _), memory, part in zip(early, kept, signal_parts):
            new_state[f"p_prev_{j}"], parts[j] = memory, part
    weights = forecast.insert_weights(gm, graph, policy_state[policy_names[-1]] if policy_names else decided, s,
                                      compute, state)
    new_state.update(weights.records)
    gain_parts = []

    replaced: dict[fx.Node, fx.Node] = {}  # outputs of rewritten regions -> their cond outputs
    branch_layouts = []

    def follow(node: fx.Node) -> fx.Node:
        return replaced.get(node, node)

    def caches(r: int, kind: str, n: int) -> list[fx.Node]:
        return [state[f"cache_{kind}_{r}_{k}" if kind else f"cache_{r}_{k}"] for k in range(n)]

    for r, region in enumerate(regions):
        # read the plan through the replacements of the regions before (the plan itself is left as it is)
        region = replace(
            region,
            inputs=[follow(n) for n in region.inputs],
            streams=[replace(s, inp=follow(s.inp)) for s in region.streams],
        )
        region_sites = [(j, replace(site, stream=replace(site.stream, inp=follow(site.stream.inp))))
                        for j, site in enumerate(sites) if site.region == r]
        n_caches = len(region.streams) + len(region.values)
        layout = BranchLayout.for_region(len(region.inputs), len(region.streams), len(region.values),
                                         len(region_sites), forecast.order, forecast.fit_gain, batch is not None)
        branch_layouts.append(layout)
        compute_gm, cached_gm = _build_branches(gm, region, region_sites, layout, policy, forecast, batch)
        gm.add_submodule(f"adacache_region{r}_compute", compute_gm)
        gm.add_submodule(f"adacache_region{r}_cached", cached_gm)
        operands = layout.operands.pack(
            inputs=region.inputs, caches=caches(r, "", n_caches),
            previous_caches=caches(r, "prev", n_caches) if forecast.order >= 1 else [],
            older_caches=caches(r, "older", n_caches) if forecast.order >= 2 else [],
            weight=weights.weights, fit_weight=weights.raw if forecast.fit_gain else [],
            site_memory=[state[f"p_prev_{j}"] for j, _ in region_sites],
            row_mask=[compute] if batch is not None else [],
        )
        with _after(graph, region.nodes[-1]):
            true_fn = graph.get_attr(f"adacache_region{r}_compute")
            false_fn = graph.get_attr(f"adacache_region{r}_cached")
            node = graph.call_function(COND, (predicate, true_fn, false_fn, tuple(operands)))
        items = _getitems(graph, node, range(len(layout.outputs)))
        out = layout.outputs.unpack(items)
        inside = set(region.nodes)
        originals = [s.out for s in region.streams] + list(region.values)
        for old, new in zip(originals, out["streams"] + out["values"]):
            new = _restore_layout(graph, new, old)
            old.replace_all_uses_with(new, delete_user_cb=lambda user, inside=inside: user not in inside)
            replaced[old] = new
        # a stream caches its residual; a value itself (kept apart when forecast)
        new_caches = out["residuals"] + (out["value_caches"] if forecast.order >= 1 else out["values"])
        for k in range(n_caches):
            new_state[f"cache_{r}_{k}"] = new_caches[k]
            if forecast.order >= 1:
                new_state[f"cache_prev_{r}_{k}"] = out["previous_caches"][k]
            if forecast.order >= 2:
                new_state[f"cache_older_{r}_{k}"] = out["older_caches"][k]
        for (j, _), memory, part in zip(region_sites, out["site_memory"], out["metric_parts"]):
            new_state[f"p_prev_{j}"] = memory
            parts[j] = part
        gain_parts += out["gain_parts"]
        for old in reversed(region.nodes):
            graph.erase_node(old)
        last = items[-1]

    gain = None
    with _after(graph, last):
        if forecast.fit_gain:  # the regions' sums add up; the gain is refitted on compute steps (see forecast.py)
            gain = new_state["forecast_gain"] = forecast.insert_gain(gm, graph, gain_parts, weights.gain)
        update = graph.call_module(
            "adacache_update", (s, compute, [parts[j] for j in range(len(sites))], policy_state, state["num_steps"])
        )
        updated, row = (graph.call_function(operator.getitem, (update, k)) for k in range(2))
        new_state.update(zip(policy_names, _getitems(graph, updated, policy_names)))
    gm.add_submodule("adacache_history", HistoryRow(policy.history_columns))
    with _after(graph, row):
        new_state["history"] = graph.call_module("adacache_history", (state["history"], s, compute, row))
    ctx.calls = PolicyNodes(decide, update, gain, [j for j, _ in early])

    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    output = graph.output_node()
    (outputs,) = output.args
    output.args = (tuple(outputs) + tuple(new_state[spec.name] for spec in specs if spec.returned),)
    graph.lint()
    gm.recompile()
    return StateLayout(tuple(specs)), branch_layouts


def run(ctx) -> str:
    ctx.layout, ctx.branch_layouts = insert_cache(ctx)
    return f"{len(ctx.regions)} torch.cond, {len(ctx.layout)} state tensors"
