"""The transform on every supported model family: exact when nothing is skipped."""

import pytest
import torch
from helpers import max_diff, run_steps

import adacache_fx as ax
from adacache_fx.tools.fixtures import FAMILIES, build


@pytest.mark.parametrize("family", FAMILIES)
def test_never_skip_equals_original(family):
    model, make_inputs = build(family)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=6, codebook=ax.presets.NEVER))
    expected = run_steps(model, make_inputs, 6)
    got = run_steps(cached, make_inputs, 6)
    assert max_diff(expected, got) < 1e-5
    rep = ax.report(cached)
    assert rep.computed_steps == [1, 2, 3, 4, 5, 6]
    # the rewritten graph really holds conditional regions covering all blocks
    program = cached.program()
    assert len(program.rewrite.regions) >= 1
    assert sum(1 for n in program.graph_module.graph.nodes if n.target is torch.ops.higher_order.cond) == len(
        program.rewrite.regions
    )


@pytest.mark.parametrize("family", ["flux", "latte", "hunyuan_video", "stdit"])
def test_fast_schedule_skips_and_keeps_outputs_close(family):
    model, make_inputs = build(family)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=12, codebook={10.0: 3}))
    expected = run_steps(model, make_inputs, 12)
    got = run_steps(cached, make_inputs, 12)
    rep = ax.report(cached)
    assert rep.computed_steps == [1, 2, 5, 8, 11, 12]  # step 1 has no metric: rate 1
    for s in rep.computed_steps:  # a compute step runs the whole model from its own inputs
        assert float((expected[s - 1] - got[s - 1]).abs().max()) < 1e-5
    cached_steps = [s for s in range(1, 13) if s not in rep.computed_steps]
    assert all(float((expected[s - 1] - got[s - 1]).abs().max()) > 0 for s in cached_steps)


#: Residual branches per model at branch granularity (4 layers). wan, stdit: self-attention, cross-attention, FFN
#: per block. latte: 4 spatial blocks of 3 and 4 temporal blocks of 2 (no cross-attention). flux: 2 two-stream
#: blocks of 4 (attention and FFN of each stream), 2 single-stream blocks of 1 (parallel attention and MLP).
#: cogvideox: 3 blocks of 4 (two streams), and 2 in the last block (its text-stream output is unused).
BRANCH_REGIONS = {"wan": 12, "cogvideox": 14, "flux": 10, "latte": 20, "stdit": 12}


@pytest.mark.parametrize("family", sorted(BRANCH_REGIONS))
def test_branch_granularity_never_skip_equals_original(family):
    model, make_inputs = build(family)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, codebook=ax.presets.NEVER, granularity="branch"))
    assert max_diff(run_steps(model, make_inputs, 4), run_steps(cached, make_inputs, 4)) < 1e-5
    rewrite = cached.program().rewrite
    assert len(rewrite.regions) == BRANCH_REGIONS[family] >= 2 * len(rewrite.blocks)
    assert set(rewrite.regions) == set(rewrite.blocks)  # every block is split
