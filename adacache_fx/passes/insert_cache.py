"""insert_cache: rewrite each planned region into a ``torch.cond`` over compute and cached branches.

Matches: the regions from :mod:`plan_regions` and the metric sites from ``plan_metric``.
Rewrites the graph into a pure function ``(inputs..., state...) -> (outputs..., new_state...)``::

    step, policy state ──decide──▶ s, compute                       (top of the graph)
    region r:  outs = cond(compute, compute_branch_r, cached_branch_r, operands)
               compute: run the region; residuals out - inp; metric parts of its sites (policy.measure)
               cached:  inp + cache (or its forecast, see :mod:`~adacache_fx.policies.forecast`)
    s, metric parts, policy state ──update──▶ next schedule, history  (bottom of the graph)

* state tensors become placeholders ``adacache_<name>`` after the user inputs, in the order of the
  returned :class:`~adacache_fx.state.StateLayout`;
* the decision rule is the :class:`~adacache_fx.policies.base.Policy` registered for the config's type;
* each cond's operands and outputs follow one :class:`~.branch_layout.BranchLayout`;
* on a cached step the region does not run at all;
* a policy with an early signal (FirstBlockCache, TeaCache) decides after it: the signal sites are
  measured in the main graph before ``decide`` (:mod:`.insert_signal`; a signal inside the first region,
  TeaCache's modulated input, is recomputed there from a copy of its ancestors).
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx

from ..policies import PolicyCall, make_policy
from ..policies.forecast import (
    FORECAST_STATE,
    GAIN_STATE,
    SECOND_ORDER_STATE,
    ExtrapolationWeight,
    ForecastGain,
    TaylorWeights,
)
from ..state import StateLayout, StateSpec
from .branch_layout import BranchLayout
from .graph_utils import PassError, fake, is_view
from .insert_signal import insert_parts, remember
from .plan_regions import MetricSite, Region

aten = torch.ops.aten
cond = torch.ops.higher_order.cond

STEP_STATE = (StateSpec("step", (), torch.int64, 0), StateSpec("num_steps", (), torch.int64, 0, returned=False))
HISTORY_STATE = StateSpec("history", None, torch.float32, float("nan"))


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


def _zero_parts(graph: fx.Graph, like: fx.Node, count: int) -> fx.Node:
    return graph.call_function(aten.new_zeros.default, (like, [count]), {"dtype": torch.float32})


def _forecast_terms(graph: fx.Graph, cache: fx.Node, prev: fx.Node, older: fx.Node | None, weights: list[fx.Node],
                    dtype) -> list[fx.Node]:
    """What a forecast adds to ``cache``, in ``dtype``: ``[w * (cache - prev)]``, and ``v * (prev - older)``
    with a quadratic one."""

    def term(a, b, weight):
        weight = graph.call_function(aten._to_copy.default, (weight,), {"dtype": dtype})
        return graph.call_function(aten.mul.Tensor, (graph.call_function(aten.sub.Tensor, (a, b)), weight))

    return [term(cache, prev, weights[0])] + ([term(prev, older, weights[1])] if older is not None else [])


def _reuse(graph: fx.Graph, cache: fx.Node, prev: fx.Node | None, older: fx.Node | None, weights: list[fx.Node],
           dtype) -> fx.Node:
    """The value a cached step uses: ``cache``; ``cache + w * (cache - prev)`` with a linear forecast;
    ``cache + u * (cache - prev) + v * (prev - older)`` with a quadratic one."""
    if prev is None or not dtype.is_floating_point:
        return cache
    value = cache
    for term in _forecast_terms(graph, cache, prev, older, weights, dtype):
        value = graph.call_function(aten.add.Tensor, (value, term))
    return value


def _gain_parts(graph: fx.Graph, new: list[fx.Node], caches: list[fx.Node], previous: list[fx.Node],
                older: list[fx.Node | None], weights: list[fx.Node]) -> fx.Node:
    """``[sum <n - c, d>, sum ||d||^2]`` over the cached tensors, all in float32: the sums the forecast
    gain is fitted from (``n`` this step's, ``c`` the cached, ``d = w (c - p) [+ v (p - o)]`` the change the
    forecast adds, computed in float32 so that a bf16 cache's rounding does not count as a change)."""
    if not caches:
        raise PassError("forecast_gain='fit' needs a floating-point cached tensor in every region", "insert_cache")

    def f32(node):
        return graph.call_function(aten._to_copy.default, (node,), {"dtype": torch.float32})

    dot = norm = None
    for n, c, p, o in zip(new, caches, previous, older):
        c32 = f32(c)
        err = graph.call_function(aten.sub.Tensor, (f32(n), c32))
        step, *more = _forecast_terms(graph, c32, f32(p), None if o is None else f32(o), weights, torch.float32)
        for term in more:
            step = graph.call_function(aten.add.Tensor, (step, term))
        d = graph.call_function(aten.sum.default, (graph.call_function(aten.mul.Tensor, (err, step)),))
        q = graph.call_function(aten.sum.default, (graph.call_function(aten.mul.Tensor, (step, step)),))
        dot = d if dot is None else graph.call_function(aten.add.Tensor, (dot, d))
        norm = q if norm is None else graph.call_function(aten.add.Tensor, (norm, q))
    return graph.call_function(aten.stack.default, ([dot, norm],))


def _build_branches(gm, region: Region, sites: list[tuple[int, MetricSite]], layout: BranchLayout,
                    policy) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Return ``(compute_gm, cached_gm)`` taking and returning ``layout``'s operands and outputs.

    ``sites``: ``(index, site)`` of the metric sites inside the region, ``index`` numbering all sites.
    """
    forecast, order = layout.forecast, layout.order
    n_caches = len(region.streams) + len(region.values)
    compute, cached = fx.Graph(), fx.Graph()

    def placeholders(graph: fx.Graph) -> dict[str, list[fx.Node]]:
        names = layout.operands.pack(
            inputs=[node.name for node in region.inputs], caches=[f"cache_{k}" for k in range(n_caches)],
            previous_caches=[f"cache_prev_{k}" for k in range(n_caches)] if forecast else [],
            older_caches=[f"cache_older_{k}" for k in range(n_caches)] if order >= 2 else [],
            weight=["w", "v"][:order], fit_weight=["fit_w", "fit_v"][:order] if layout.fit_gain else [],
            site_memory=[f"p_prev_{j}" for j, _ in sites],
        )
        return layout.operands.unpack([graph.placeholder(name) for name in names])

    # compute: the region itself; it reads the caches only to hand them on as the previous ones
    ops = placeholders(compute)
    env: dict[fx.Node, fx.Node] = dict(zip(region.inputs, ops["inputs"]))
    for node in region.nodes:
        for arg in node.all_input_nodes:
            if arg not in env and arg.op == "get_attr":
                env[arg] = compute.get_attr(arg.target)
        env[node] = compute.node_copy(node, lambda arg: env[arg])
    outs = [_fresh(compute, env[s.out], s.out) for s in region.streams]
    values = [_fresh(compute, env[v], v) for v in region.values]
    residuals = [compute.call_function(aten.sub.Tensor, (env[s.out], env[s.inp])) for s in region.streams]
    memory, parts = [], []
    for (j, site), p_prev in zip(sites, ops["site_memory"]):
        if site.value is not None:
            p = _fresh(compute, env[site.value], site.value)
            if any(p is other for other in outs + values):  # an output already: a second one must not alias it
                p = compute.call_function(aten.clone.default, (p,))
        else:
            p = compute.call_function(aten.sub.Tensor, (env[site.stream.out], env[site.stream.inp]))
        memory.append(p)
        parts.append(compute.call_module("adacache_measure", (j, p, p_prev)))
    dtypes = [fake(v).dtype for v in [s.out for s in region.streams] + list(region.values)]
    gain_parts = []
    if layout.fit_gain:  # how well the forecast from the earlier compute steps predicts this step's
        keep = [k for k in range(n_caches) if dtypes[k].is_floating_point]
        new, older = residuals + values, ops["older_caches"] or [None] * n_caches
        gain_parts = [_gain_parts(compute, *([group[k] for k in keep] for group in (
            new, ops["caches"], ops["previous_caches"], older)), ops["fit_weight"])]
    compute.output(tuple(layout.outputs.pack(
        streams=outs, values=values, residuals=residuals,
        # a forecast value is not its own cache: keep the computed one apart
        value_caches=[compute.call_function(aten.clone.default, (v,)) for v in values] if forecast else [],
        previous_caches=[compute.call_function(aten.clone.default, (c,)) for c in ops["caches"]] if forecast else [],
        older_caches=[compute.call_function(aten.clone.default, (c,)) for c in ops["previous_caches"]] if order >= 2
        else [],
        site_memory=memory, metric_parts=parts, gain_parts=gain_parts,
    )))

    # cached: inp + the (forecast) residual, the caches handed on unchanged, no metric
    ops = placeholders(cached)
    stream_in = dict(zip(region.inputs, ops["inputs"]))
    previous = ops["previous_caches"] or [None] * n_caches
    older = ops["older_caches"] or [None] * n_caches
    reused = [_reuse(cached, c, p, o, ops["weight"], dtype)
              for c, p, o, dtype in zip(ops["caches"], previous, older, dtypes)]
    n = len(region.streams)
    like = ops["caches"][0]
    cached.output(tuple(layout.outputs.pack(
        streams=[cached.call_function(aten.add.Tensor, (stream_in[s.inp], reused[k]))
                 for k, s in enumerate(region.streams)],
        values=[cached.call_function(aten.clone.default, (v,)) if v is c else v
                for v, c in zip(reused[n:], ops["caches"][n:])],
        residuals=[cached.call_function(aten.clone.default, (c,)) for c in ops["caches"][:n]],
        value_caches=[cached.call_function(aten.clone.default, (c,)) for c in ops["caches"][n:]] if forecast else [],
        previous_caches=[cached.call_function(aten.clone.default, (p,)) for p in ops["previous_caches"]],
        older_caches=[cached.call_function(aten.clone.default, (p,)) for p in ops["older_caches"]],
        site_memory=[cached.call_function(aten.clone.default, (p,)) for p in ops["site_memory"]],
        metric_parts=[_zero_parts(cached, like, policy.num_parts(j)) for j, _ in sites],
        gain_parts=[_zero_parts(cached, like, 2)] if layout.fit_gain else [],
    )))

    compute_gm = fx.GraphModule(gm, compute, class_name="ComputeBranch")
    cached_gm = fx.GraphModule(torch.nn.Module(), cached, class_name="CachedBranch")
    return compute_gm, cached_gm


def _state_specs(policy, regions: list[Region], sites: list[MetricSite], order: int, fit_gain: bool
                 ) -> list[StateSpec]:
    specs = [*STEP_STATE, *policy.state_specs(), HISTORY_STATE]
    for j, site in enumerate(sites):
        value = fake(site.value if site.value is not None else site.stream.out)
        specs.append(StateSpec(f"p_prev_{j}", tuple(value.shape), value.dtype, 0.0, cache=True))
    if order >= 1:
        specs += FORECAST_STATE
    if order >= 2:
        specs += SECOND_ORDER_STATE
    if fit_gain:
        specs += GAIN_STATE
    for r, region in enumerate(regions):
        for k, value in enumerate([s.out for s in region.streams] + list(region.values)):
            value = fake(value)
            specs.append(StateSpec(f"cache_{r}_{k}", tuple(value.shape), value.dtype, 0.0, cache=True))
            if order >= 1:
                specs.append(StateSpec(f"cache_prev_{r}_{k}", tuple(value.shape), value.dtype, 0.0, cache=True))
            if order >= 2:
                specs.append(StateSpec(f"cache_older_{r}_{k}", tuple(value.shape), value.dtype, 0.0, cache=True))
    return specs


def insert_cache(
    gm: fx.GraphModule,
    regions: list[Region],
    sites: list[MetricSite],
    config,
    frame_layout: tuple[int, int] | None = None,
    shard=None,
) -> tuple[StateLayout, list[BranchLayout]]:
    """Rewrite ``gm`` in place; return its state layout and each region's branch layout. ``shard``: the
    metric residual's :class:`~adacache_fx.parallel.SequenceShard` under context parallelism (MoReg)."""
    graph = gm.graph
    policy = make_policy(config, len(sites), frame_layout, shard)
    order = config.extrapolation_order
    forecast = order >= 1
    fit_gain = forecast and config.forecast_gain == "fit"
    specs = _state_specs(policy, regions, sites, order, fit_gain)
    policy_names = [spec.name for spec in policy.state_specs()]

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    state: dict[str, fx.Node] = {}
    with _after(graph, placeholders[-1]):
        for spec in specs:
            state[spec.name] = graph.placeholder(f"adacache_{spec.name}")

    gm.add_submodule("adacache_policy", policy)
    for method in ("decide", "measure", "update"):
        gm.add_submodule(f"adacache_{method}", PolicyCall(policy, method))
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
    new_state: dict[str, fx.Node] = {"step": s}
    parts: dict[int, fx.Node] = {}  # metric parts by site index
    if early:
        kept = remember(graph, decided, compute, signal_ps, [state[f"p_prev_{j}"] for j, _ in early],
                        policy.remember_signal)
        for (j, _), memory, part in zip(early, kept, signal_parts):
            new_state[f"p_prev_{j}"], parts[j] = memory, part
    weight = []
    if forecast:
        records = ["last_compute", "prev_compute", "older_compute"][: order + 1]
        gm.add_submodule("adacache_extrapolation", ExtrapolationWeight() if order == 1 else TaylorWeights())
        with _after(graph, policy_state[policy_names[-1]] if policy_names else decided):
            node = graph.call_module("adacache_extrapolation", (s, compute, *[state[name] for name in records]))
        items = _getitems(graph, node, range(order + len(records)))
        weight, raw_weight = items[:order], items[:order]
        new_state.update(zip(records, items[order:]))
        gain = config.forecast_gain
        if gain != 1.0:
            with _after(graph, items[-1]):
                if fit_gain:  # a new generation starts from the whole forecast again
                    fitted = state["forecast_gain"]
                    first = graph.call_function(aten.eq.Scalar, (s, 1))
                    gain = graph.call_function(aten.where.self, (first, graph.call_function(
                        aten.full_like.default, (fitted, 1.0)), fitted))
                weight = [graph.call_function(aten.mul.Tensor, (w, gain)) for w in raw_weight]
    gain_parts = []

    replaced: dict[fx.Node, fx.Node] = {}  # outputs of rewritten regions -> their cond outputs
    branch_layouts = []

    def follow(node: fx.Node) -> fx.Node:
        return replaced.get(node, node)

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
                                         len(region_sites), order, fit_gain)
        branch_layouts.append(layout)
        compute_gm, cached_gm = _build_branches(gm, region, region_sites, layout, policy)
        gm.add_submodule(f"adacache_region{r}_compute", compute_gm)
        gm.add_submodule(f"adacache_region{r}_cached", cached_gm)
        operands = layout.operands.pack(
            inputs=region.inputs, caches=[state[f"cache_{r}_{k}"] for k in range(n_caches)],
            previous_caches=[state[f"cache_prev_{r}_{k}"] for k in range(n_caches)] if forecast else [],
            older_caches=[state[f"cache_older_{r}_{k}"] for k in range(n_caches)] if order >= 2 else [],
            weight=weight, fit_weight=raw_weight if fit_gain else [],
            site_memory=[state[f"p_prev_{j}"] for j, _ in region_sites],
        )
        with _after(graph, region.nodes[-1]):
            true_fn = graph.get_attr(f"adacache_region{r}_compute")
            false_fn = graph.get_attr(f"adacache_region{r}_cached")
            node = graph.call_function(cond, (compute, true_fn, false_fn, tuple(operands)))
        items = _getitems(graph, node, range(len(layout.outputs)))
        out = layout.outputs.unpack(items)
        inside = set(region.nodes)
        originals = [s.out for s in region.streams] + list(region.values)
        for old, new in zip(originals, out["streams"] + out["values"]):
            old.replace_all_uses_with(new, delete_user_cb=lambda user, inside=inside: user not in inside)
            replaced[old] = new
        # a stream caches its residual; a value itself (kept apart when forecast)
        new_caches = out["residuals"] + (out["value_caches"] if forecast else out["values"])
        for k in range(n_caches):
            new_state[f"cache_{r}_{k}"] = new_caches[k]
            if forecast:
                new_state[f"cache_prev_{r}_{k}"] = out["previous_caches"][k]
            if order >= 2:
                new_state[f"cache_older_{r}_{k}"] = out["older_caches"][k]
        for (j, _), memory, part in zip(region_sites, out["site_memory"], out["metric_parts"]):
            new_state[f"p_prev_{j}"] = memory
            parts[j] = part
        gain_parts += out["gain_parts"]
        for old in reversed(region.nodes):
            graph.erase_node(old)
        last = items[-1]

    with _after(graph, last):
        if fit_gain:  # the regions' sums add up; the gain is refitted on compute steps (see forecast.py)
            gm.add_submodule("adacache_forecast_gain", ForecastGain())
            total = gain_parts[0]
            for more in gain_parts[1:]:
                total = graph.call_function(aten.add.Tensor, (total, more))
            new_state["forecast_gain"] = graph.call_module("adacache_forecast_gain", (total, gain))
        update = graph.call_module(
            "adacache_update", (s, compute, [parts[j] for j in range(len(sites))], policy_state, state["history"])
        )
    updated, new_state["history"] = _getitems(graph, update, range(2))
    new_state.update(zip(policy_names, _getitems(graph, updated, policy_names)))

    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    output = graph.output_node()
    (outputs,) = output.args
    output.args = (tuple(outputs) + tuple(new_state[spec.name] for spec in specs if spec.returned),)
    graph.lint()
    gm.recompile()
    return StateLayout(tuple(specs)), branch_layouts
