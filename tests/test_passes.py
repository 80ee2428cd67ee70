"""Every pass alone on a small captured graph: what it matches, what it rewrites (passes/README.md).

Each test captures the tiny plain-torch DiT (or a fixture family), runs the stages before the one under
test through their ``run(ctx)``, then checks that stage's result against what the graph holds."""

import datetime
import operator

import pytest
import torch
import torch.distributed as dist

import adacache_fx as ax
from adacache_fx.capture import capture
from adacache_fx.ops import layout_barrier
from adacache_fx.passes import (
    PIPELINE,
    PassContext,
    PassError,
    find_blocks,
    frame_layout,
    insert_cache,
    layout_barriers,
    plan_metric,
    plan_regions,
    stage_name,
)
from adacache_fx.passes import reduce_metric as reduce_metric_pass
from adacache_fx.passes.graph_utils import cond_nodes
from adacache_fx.policies import FrameNeeds
from adacache_fx.tools.fixtures import build, tiny_dit


def context(config=None, family=None, functional=False, upto=None):
    """A PassContext over a fresh capture, with the stages before ``upto`` run."""
    model, make_inputs = tiny_dit() if family is None else build(family, num_layers=4)
    captured = capture(model, (), make_inputs(0), functional=functional)
    gm = captured.graph_module
    ctx = PassContext(gm, config or ax.AdaCacheConfig(num_steps=6))
    ctx.num_user_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    ctx.num_user_outputs = len(gm.graph.output_node().args[0])
    for stage in PIPELINE:
        if stage is upto:
            break
        stage.run(ctx)
    return ctx, captured, make_inputs


def test_find_blocks_matches_the_indexed_children_in_order():
    ctx, _, _ = context(upto=plan_regions)
    assert [b.path for b in ctx.blocks] == [f"blocks.{i}" for i in range(4)]
    for block in ctx.blocks:
        scopes = {find_blocks.block_scope(n) for n in block.nodes}
        assert scopes == {block.path}  # every node of a block runs inside it
    order = {n: i for i, n in enumerate(ctx.graph.nodes)}
    assert all(order[a.nodes[-1]] < order[b.nodes[0]] for a, b in zip(ctx.blocks, ctx.blocks[1:]))


@pytest.mark.parametrize("granularity,count", [("stack", 1), ("block", 4), ("branch", 12)])
def test_plan_regions_covers_every_block_once(granularity, count):
    ctx, _, _ = context(ax.AdaCacheConfig(num_steps=6, granularity=granularity), functional=granularity == "branch",
                        upto=plan_metric)
    assert len(ctx.regions) == count
    covered = [n for region in ctx.regions for n in region.nodes]
    assert len(covered) == len(set(covered))
    for region in ctx.regions:
        # every value leaving a region is a stream update (or, per branch, the branch value itself)
        assert region.streams or region.values
        for stream in region.streams:
            assert stream.out in region.nodes and stream.inp not in region.nodes


def test_plan_metric_reads_the_middle_block_first_branch_and_refuses_out_of_range():
    ctx, _, _ = context(upto=frame_layout)
    (site,) = ctx.sites
    assert site.block.path == "blocks.2" and site.region == 0
    assert site.value is site.stream.adds[0][2]  # the self-attention residual branch
    assert plan_metric.site_names(ctx) == ["blocks.2 branch 0"]
    ctx, _, _ = context(ax.AdaCacheConfig(num_steps=6, metric_block=7), upto=plan_metric)
    with pytest.raises(PassError, match="metric_block 7 is out of range: the stack has 4 blocks"):
        plan_metric.run(ctx)


@pytest.mark.parametrize("config,value", [(ax.FirstBlockCacheConfig(num_steps=6), None),
                                          (ax.TeaCacheConfig(num_steps=6), "linear input")])
def test_plan_metric_reads_an_early_signal_outside_the_regions(config, value):
    ctx, _, _ = context(config, upto=frame_layout)
    (site,) = ctx.sites
    assert site.region is None and site.block.path == "blocks.0"
    if value is None:  # the first block's residual; the regions start after it
        assert site.value is None and ctx.regions[0].blocks[0].path == "blocks.1"
    else:  # the input of the first block's first linear layer on its stream; every block stays cached
        users = [u for u in site.value.users if u.target is torch.ops.aten.linear.default]
        assert users and ctx.regions[0].blocks[0].path == "blocks.0"


def test_plan_metric_reads_an_early_signal_and_a_metric_residual_together():
    ctx, _, _ = context(ax.EasyCacheConfig(num_steps=6), upto=frame_layout)
    signal, metric = ctx.sites
    assert signal.region is None and metric.region == 0 and metric.block.path == "blocks.2"


def test_frame_layout_reads_batch_and_frames_from_the_patch_embedding():
    ctx, _, _ = context(ax.AdaCacheConfig(num_steps=6, moreg=ax.MoRegConfig()), family="wan", upto=insert_cache)
    assert ctx.frame_layout == (1, 2) and ctx.shard is None
    site = ctx.sites[0]
    with pytest.raises(PassError, match="must be smaller than the 2 latent frames"):
        frame_layout.motion_layout(ctx.graph, FrameNeeds(max_stride=2), site.value, site.block.path)
    ctx, _, _ = context(ax.AdaCacheConfig(num_steps=6), family="wan", upto=insert_cache)
    assert frame_layout.run(ctx) == "no motion read: skipped" and ctx.frame_layout is None


def test_insert_cache_makes_a_pure_function_of_inputs_and_state():
    ctx, captured, make_inputs = context(upto=insert_cache)
    flat = captured.flatten_inputs((), make_inputs(0))
    with torch.no_grad():
        expected = captured.graph_module(*flat)
    insert_cache.run(ctx)
    (cond,) = cond_nodes(ctx.graph)
    assert ctx.policy is not None and ctx.calls.decide.target == "adacache_decide"
    assert ctx.calls.update.args[0].args == (ctx.calls.decide, 0)  # update reads the step decide returned
    assert ctx.layout.names[:2] == ["step", "num_steps"] and "cache_0_0" in ctx.layout.names
    assert ctx.layout.spec("history").columns == ("metric", "motion", "rate")
    state = ctx.layout.allocate(6)
    with torch.no_grad():
        outputs = ctx.graph_module(*flat, *state.values())
    n = ctx.num_user_outputs
    assert torch.equal(outputs[0], expected[0])  # step 1 computes: the model's output
    new = dict(zip([s.name for s in ctx.layout.returned], outputs[n:]))
    assert int(new["step"]) == 1 and float(new["history"][0, 0]) == 1.0
    assert operator.getitem in {n.target for n in cond.users}


def test_reduce_metric_adds_nothing_in_one_process_and_one_all_reduce_under_a_group():
    ctx, captured, make_inputs = context(upto=insert_cache)
    insert_cache.run(ctx)
    assert reduce_metric_pass.run(ctx) == "no collectives: skipped"
    ctx, captured, make_inputs = context(upto=insert_cache)
    insert_cache.run(ctx)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        ctx.process_group = dist.group.WORLD
        assert reduce_metric_pass.reduce_metric(ctx) == 1
        reduces = [n for n in ctx.graph.nodes if n.target is torch.ops._c10d_functional.all_reduce.default]
        assert len(reduces) == 1
        parts = ctx.calls.update.args[2]
        assert all(reduces[0] in _ancestors(p) for p in parts)  # the reduced parts reach update
        state = ctx.layout.allocate(6)
        flat = captured.flatten_inputs((), make_inputs(0))
        with torch.no_grad():
            ctx.graph_module(*flat, *state.values())
    finally:
        dist.destroy_process_group()


def _ancestors(node):
    seen, todo = set(), [node]
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def test_layout_barriers_pin_every_operand_computed_in_the_graph():
    ctx, _, _ = context(upto=layout_barriers)
    (cond,) = cond_nodes(ctx.graph)
    computed = [op for op in cond.args[3] if op.op not in ("placeholder", "get_attr")]
    assert layout_barriers.run(ctx) == f"{len(computed)} layout barriers"
    assert all(op.op in ("placeholder", "get_attr") or op.target is layout_barrier for op in cond.args[3])


def test_every_stage_is_a_module_with_run():
    names = [stage_name(stage) for stage in PIPELINE]
    assert names == ["drop_identities", "hoist_buffer_writes", "find_blocks", "plan_regions", "plan_metric",
                     "frame_layout", "insert_cache", "reduce_metric", "flat_cond_outputs", "layout_barriers"]
    assert all(callable(stage.run) and stage.__doc__ for stage in PIPELINE)
