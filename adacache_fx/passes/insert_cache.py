"""insert_cache: rewrite each planned region into a ``torch.cond`` over compute and cached branches.

Matches: the regions from :mod:`plan_regions` and the metric sites from ``plan_metric``.
Rewrites the graph into a pure function ``(inputs..., state...) -> (outputs..., new_state...)``:

* state tensors become placeholders after the user inputs (see :class:`StateSpec`);
* a :class:`~adacache_fx.policy.StepBegin` call at the top yields the 0-dim bool ``compute``;
* each region's nodes move into a *compute* branch that returns every stream's new value, its
  residual ``out - inp``, the metric residual and its distances; a *cached* branch returns
  ``inp + cached_residual`` and the cached values unchanged; ``torch.cond(compute, ...)`` picks one,
  so on a cached step the region does not run at all;
* with ``extrapolation_order=1`` every cached tensor keeps the one before it too, and the cached branch
  adds ``cache + w * (cache - cache_prev)`` with ``w`` from :class:`~adacache_fx.policy.ExtrapolationWeight`;
* a :class:`~adacache_fx.policy.StepEnd` call after the last region computes the next schedule.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx

from ..policy import ExtrapolationWeight, MotionMagnitude, ResidualDistance, StepBegin, StepEnd
from ..state import StateLayout, StateSpec
from .graph_utils import fake, is_view
from .plan_regions import MetricSite, Region

aten = torch.ops.aten
cond = torch.ops.higher_order.cond


SCALAR_STATE = (
    StateSpec("step", (), torch.int64, 0),
    StateSpec("num_steps", (), torch.int64, 0, returned=False),
    StateSpec("rate", (), torch.int64, 1),
    StateSpec("next_compute", (), torch.int64, 1),
    StateSpec("m_prev", (), torch.float32, 1.0),
    StateSpec("history", None, torch.float32, float("nan")),
)


def _after(graph: fx.Graph, node: fx.Node):
    """Insert new nodes right after ``node``, in creation order."""
    return graph.inserting_before(node.next)


def _getitems(graph: fx.Graph, node: fx.Node, count: int) -> list[fx.Node]:
    with _after(graph, node):
        return [graph.call_function(operator.getitem, (node, i)) for i in range(count)]


def _fresh(graph: fx.Graph, value: fx.Node, original: fx.Node) -> fx.Node:
    """A branch output must be dense and contiguous, and alias no input nor other output: copy views
    and non-contiguous values (``original`` is the captured node whose metadata tells)."""
    meta = fake(original)
    if is_view(original) or meta is None or not meta.is_contiguous():
        return graph.call_function(aten.clone.default, (value,), {"memory_format": torch.contiguous_format})
    return value


def _scalar_zero(graph: fx.Graph, like: fx.Node) -> fx.Node:
    return graph.call_function(aten.new_zeros.default, (like, []), {"dtype": torch.float32})


def _reuse(graph: fx.Graph, cache: fx.Node, prev: fx.Node | None, w: fx.Node | None, dtype) -> fx.Node:
    """The value a cached step uses: ``cache``, or ``cache + w * (cache - prev)`` when extrapolating."""
    if prev is None or not dtype.is_floating_point:
        return cache
    w = graph.call_function(aten._to_copy.default, (w,), {"dtype": dtype})
    delta = graph.call_function(aten.sub.Tensor, (cache, prev))
    return graph.call_function(aten.add.Tensor, (cache, graph.call_function(aten.mul.Tensor, (delta, w))))


def _build_branches(gm, region: Region, sites: list[MetricSite], motion_index: int | None, extrapolate: bool):
    """Return ``(compute_gm, cached_gm)`` with identical signatures and output metadata.

    Operands: region inputs, caches, (previous caches and the weight ``w`` when extrapolating), previous
    metric residuals. Outputs: new stream values, cached-as-value outputs, stream residuals, (the value
    caches and the previous caches when extrapolating), metric residuals, their distances, the motion
    metric.
    """
    n_caches = len(region.streams) + len(region.values)
    compute, cached = fx.Graph(), fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in region.inputs:
        env[node] = compute.placeholder(node.name)
    # the compute branch reads the caches only to hand them on as the previous ones: both branches take
    # the same operands
    old_caches = [compute.placeholder(f"cache_{k}") for k in range(n_caches)]
    if extrapolate:
        for k in range(n_caches):
            compute.placeholder(f"cache_prev_{k}")
        compute.placeholder("w")
    p_prev_in = [compute.placeholder(f"p_prev_{j}") for j in range(len(sites))]
    for node in region.nodes:
        for arg in node.all_input_nodes:
            if arg not in env and arg.op == "get_attr":
                env[arg] = compute.get_attr(arg.target)
        env[node] = compute.node_copy(node, lambda arg: env[arg])
    outs = [_fresh(compute, env[s.out], s.out) for s in region.streams]
    values = [_fresh(compute, env[v], v) for v in region.values]
    residuals = [compute.call_function(aten.sub.Tensor, (env[s.out], env[s.inp])) for s in region.streams]
    p_values, distances = [], []
    for j, site in enumerate(sites):
        if site.value is not None:
            p = _fresh(compute, env[site.value], site.value)
            if any(p is other for other in outs + values):  # an output already: a second one must not alias it
                p = compute.call_function(aten.clone.default, (p,))
        else:
            p = compute.call_function(aten.sub.Tensor, (env[site.stream.out], env[site.stream.inp]))
        p_values.append(p)
        distances.append(compute.call_module("adacache_distance", (p, p_prev_in[j])))
    motions = []
    if motion_index is not None:
        motions.append(compute.call_module("adacache_motion", (p_values[motion_index],)))
    # an extrapolated value is not its own cache: keep the computed one apart
    value_caches = [compute.call_function(aten.clone.default, (v,)) for v in values] if extrapolate else []
    handed_on = [compute.call_function(aten.clone.default, (c,)) for c in old_caches] if extrapolate else []
    compute.output(tuple(outs + values + residuals + value_caches + handed_on + p_values + distances + motions))

    c_inputs = [cached.placeholder(node.name) for node in region.inputs]
    c_cache = [cached.placeholder(f"cache_{k}") for k in range(n_caches)]
    c_prev = [cached.placeholder(f"cache_prev_{k}") for k in range(n_caches)] if extrapolate else [None] * n_caches
    w = cached.placeholder("w") if extrapolate else None
    c_p_prev = [cached.placeholder(f"p_prev_{j}") for j in range(len(sites))]
    stream_in = {node: ph for node, ph in zip(region.inputs, c_inputs)}
    n = len(region.streams)
    dtypes = [fake(v).dtype for v in [s.out for s in region.streams] + list(region.values)]
    reused = [_reuse(cached, c, p, w, dtype) for c, p, dtype in zip(c_cache, c_prev, dtypes)]
    c_outs = [cached.call_function(aten.add.Tensor, (stream_in[s.inp], reused[k])) for k, s in
              enumerate(region.streams)]
    c_values = [cached.call_function(aten.clone.default, (v,)) if v is c else v for v, c in
                zip(reused[n:], c_cache[n:])]
    c_res = [cached.call_function(aten.clone.default, (c,)) for c in c_cache[: n + len(value_caches)]]
    c_kept = [cached.call_function(aten.clone.default, (p,)) for p in c_prev] if extrapolate else []
    c_p = [cached.call_function(aten.clone.default, (p,)) for p in c_p_prev]
    like = c_cache[0]
    c_dist = [_scalar_zero(cached, like) for _ in sites]
    c_motion = [_scalar_zero(cached, like) for _ in motions]
    cached.output(tuple(c_outs + c_values + c_res + c_kept + c_p + c_dist + c_motion))

    compute_gm = fx.GraphModule(gm, compute, class_name="ComputeBranch")
    cached_gm = fx.GraphModule(torch.nn.Module(), cached, class_name="CachedBranch")
    return compute_gm, cached_gm


def insert_cache(
    gm: fx.GraphModule,
    regions: list[Region],
    sites: list[MetricSite],
    config,
    frame_layout: tuple[int, int] | None = None,
) -> StateLayout:
    """Rewrite ``gm`` in place and return the layout of its state tensors."""
    codebook, moreg = dict(config.codebook), config.moreg
    compute_steps, warmup_steps = config.compute_steps, config.warmup_steps
    extrapolation_order = config.extrapolation_order
    graph = gm.graph
    specs = list(SCALAR_STATE)
    for j, site in enumerate(sites):
        value = site.value if site.value is not None else site.stream.out
        specs.append(StateSpec(f"p_prev_{j}", tuple(fake(value).shape), fake(value).dtype, 0.0, cache=True))
    extrapolate = extrapolation_order == 1
    if extrapolate:
        specs += [StateSpec("last_compute", (), torch.int64, 0), StateSpec("prev_compute", (), torch.int64, 0)]
    for r, region in enumerate(regions):
        for k, value in enumerate([s.out for s in region.streams] + list(region.values)):
            specs.append(StateSpec(f"cache_{r}_{k}", tuple(fake(value).shape), fake(value).dtype, 0.0, cache=True))
            if extrapolate:
                specs.append(StateSpec(f"cache_prev_{r}_{k}", tuple(fake(value).shape), fake(value).dtype, 0.0,
                                           cache=True))

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    state: dict[str, fx.Node] = {}
    with _after(graph, placeholders[-1]):
        for spec in specs:
            state[spec.name] = graph.placeholder(f"adacache_{spec.name}")
    last_state = state[specs[-1].name]

    gm.add_submodule("adacache_begin", StepBegin(compute_steps, warmup_steps))
    gm.add_submodule("adacache_end", StepEnd(codebook, moreg))
    gm.add_submodule("adacache_distance", ResidualDistance())
    if moreg is not None:
        batch, frames = frame_layout
        gm.add_submodule("adacache_motion", MotionMagnitude(batch, frames, moreg.strides))

    with _after(graph, last_state):
        begin = graph.call_module(
            "adacache_begin",
            tuple(state[k] for k in ("step", "num_steps", "rate", "next_compute", "m_prev")),
        )
    s, compute, rate, next_compute, m_prev = _getitems(graph, begin, 5)
    distances, motions, new_state = [], [], {}
    w = None
    if extrapolate:
        gm.add_submodule("adacache_extrapolation", ExtrapolationWeight())
        with _after(graph, m_prev):
            weight = graph.call_module(
                "adacache_extrapolation", (s, compute, state["last_compute"], state["prev_compute"])
            )
        w, new_state["last_compute"], new_state["prev_compute"] = _getitems(graph, weight, 3)

    replaced: dict[fx.Node, fx.Node] = {}  # outputs of rewritten regions -> their cond outputs

    def follow(node: fx.Node) -> fx.Node:
        return replaced.get(node, node)

    for r, region in enumerate(regions):
        # read the plan through the replacements of the regions before (the plan itself is left as it is)
        region = replace(
            region,
            inputs=[follow(n) for n in region.inputs],
            streams=[replace(s, inp=follow(s.inp)) for s in region.streams],
        )
        site_ids = [j for j, site in enumerate(sites) if site.region == r]
        region_sites = [replace(sites[j], stream=replace(sites[j].stream, inp=follow(sites[j].stream.inp)))
                        for j in site_ids]
        motion_index = site_ids.index(0) if moreg is not None and 0 in site_ids else None  # MoReg reads site 0
        region_motion = motion_index is not None
        compute_gm, cached_gm = _build_branches(gm, region, region_sites, motion_index, extrapolate)
        compute_gm.add_submodule("adacache_distance", gm.adacache_distance)
        if region_motion:
            compute_gm.add_submodule("adacache_motion", gm.adacache_motion)
        gm.add_submodule(f"adacache_region{r}_compute", compute_gm)
        gm.add_submodule(f"adacache_region{r}_cached", cached_gm)
        n, n_values = len(region.streams), len(region.values)
        n_value_caches = n_values if extrapolate else 0
        n_kept = n + n_values if extrapolate else 0
        operands = (
            list(region.inputs)
            + [state[f"cache_{r}_{k}"] for k in range(n + n_values)]
            + ([state[f"cache_prev_{r}_{k}"] for k in range(n_kept)] + [w] if extrapolate else [])
            + [state[f"p_prev_{j}"] for j in site_ids]
        )
        with _after(graph, region.nodes[-1]):
            true_fn = graph.get_attr(f"adacache_region{r}_compute")
            false_fn = graph.get_attr(f"adacache_region{r}_cached")
            node = graph.call_function(cond, (compute, true_fn, false_fn, tuple(operands)))
        items = _getitems(
            graph, node,
            2 * n + n_values + n_value_caches + n_kept + 2 * len(region_sites) + region_motion,
        )
        inside = set(region.nodes)
        outputs = [s.out for s in region.streams] + list(region.values)
        for k, out in enumerate(outputs):
            out.replace_all_uses_with(items[k], delete_user_cb=lambda user, inside=inside: user not in inside)
            replaced[out] = items[k]
            # a stream caches its residual (after the outputs), a value itself (apart when extrapolated)
            new_state[f"cache_{r}_{k}"] = items[n + n_values + k] if k < n or extrapolate else items[k]
        for k in range(n_kept):
            new_state[f"cache_prev_{r}_{k}"] = items[2 * n + n_values + n_value_caches + k]
        first_p = 2 * n + n_values + n_value_caches + n_kept
        for i, j in enumerate(site_ids):
            new_state[f"p_prev_{j}"] = items[first_p + i]
            distances.append(items[first_p + len(region_sites) + i])
        if region_motion:
            motions.append(items[-1])
        for old in reversed(region.nodes):
            graph.erase_node(old)
        last = items[-1]

    with _after(graph, last):
        if len(distances) == 1:
            distance = distances[0]
        else:
            distance = graph.call_function(aten.mean.default, (graph.call_function(aten.stack.default, (distances,)),))
        motion = motions[0] if motions else distance
        end = graph.call_module(
            "adacache_end", (s, compute, distance, motion, rate, next_compute, m_prev, state["history"])
        )
    for name, item in zip(("step", "rate", "next_compute", "m_prev", "history"), _getitems(graph, end, 5)):
        new_state[name] = item

    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    output = graph.output_node()
    (outputs,) = output.args
    output.args = (tuple(outputs) + tuple(new_state[spec.name] for spec in specs if spec.returned),)
    graph.lint()
    gm.recompile()
    return StateLayout(tuple(specs))
