"""A cached step does not run the skipped region: count executed FLOPs and matmul calls.

``torch.utils.flop_counter`` counts a ``torch.cond`` statically (both branches), so the executed work
is read from the profiler, which sees only the branch that ran.
"""

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import adacache_fx as ax
from adacache_fx.tools.fixtures import build

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm"}
HEAVY = MATMULS | {"aten::convolution", "aten::_convolution", "aten::conv3d", "aten::conv2d"}


class PassThrough(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def executed(fn) -> tuple[int, int]:
    """(FLOPs of matmuls and convolutions, matmul calls) that actually ran."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    events = prof.events()
    return sum(e.flops or 0 for e in events if e.name in HEAVY), sum(1 for e in events if e.name in MATMULS)


def test_cached_step_costs_only_what_is_outside_the_stack():
    model, make_inputs = build("wan")
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=6, compute_steps=(1, 2, 5, 6)))
    with torch.no_grad():
        cached(**make_inputs(0))  # the first call captures; count the steps of a fresh generation
    ax.reset(cached)
    per_step = [executed(lambda s=s: cached(**make_inputs(s))) for s in range(6)]
    full = executed(lambda: model(**make_inputs(0)))
    blocks = model.blocks
    model.blocks = nn.ModuleList(PassThrough() for _ in blocks)
    try:
        outside = executed(lambda: model(**make_inputs(0)))
    finally:
        model.blocks = blocks
    assert outside[0] < full[0] / 4
    assert per_step[0] == per_step[1] == per_step[4] == per_step[5] == full  # compute steps: the whole model
    assert per_step[2] == per_step[3] == outside  # cached steps: nothing of the block stack runs


@pytest.mark.parametrize("family,granularity", [("stdit", "block"), ("wan", "branch"), ("cogvideox", "block")])
def test_cached_steps_run_no_block_matmul(family, granularity):
    """Per block or per branch: a cached step runs only the embeddings and the output head."""
    model, make_inputs = build(family)
    config = ax.AdaCacheConfig(num_steps=5, compute_steps=(1, 4, 5), granularity=granularity)
    cached = ax.transform(model, config)
    with torch.no_grad():
        cached(**make_inputs(0))  # capture first: count a fresh generation
    ax.reset(cached)
    calls = [executed(lambda s=s: cached(**make_inputs(s)))[1] for s in range(5)]
    assert calls[0] == calls[3] == calls[4] > 0
    assert calls[1] == calls[2] < calls[0] / 4
