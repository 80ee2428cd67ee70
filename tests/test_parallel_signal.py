"""Context parallelism with an early-signal policy: FirstBlockCache (and TeaCache, whose signal is the first
block's modulated input, copied out of the cached region) on a tiny Wan under diffusers' Ulysses plan
(unmodified) on 2 gloo ranks on CPU.

The signal (the first block's residual change, a ratio of sums over the rank's shard of the tokens) is
all-reduced over the group right before ``decide``; with a threshold between the reduced signal and a
rank's own shard signal, the ranks compute one process's steps only thanks to that reduction. One spawn
of 2 processes runs every scenario; each rank saves what it saw and the tests compare it with one process.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from parallel_helpers import NUM_LAYERS, NUM_STEPS, WORLD, parallel_model, process_group, run_config, spawn

import adacache_fx
from adacache_fx.passes import PIPELINE, reduce_metric

pytest.importorskip("diffusers")
from adacache_fx.tools import fixtures  # noqa: E402

VARIANTS = {"stack": {}, "block": {"granularity": "block"}}  # "stack" last: its graph's collectives are read
TIMEOUT_S = 180  # the whole spawn; each collective times out after 60 s
SIGNAL_STEP = 2  # the first step whose signal is compared (step 1 always computes); index 1 of the history


def config(threshold: float, **options) -> adacache_fx.FirstBlockCacheConfig:
    return adacache_fx.FirstBlockCacheConfig(threshold=threshold, num_steps=NUM_STEPS, **options)


def main_graph_collectives(cached) -> tuple[Counter, list[bool]]:
    """The collectives of the main graph (not its cond branches) by kind, and whether each all-reduce
    comes before ``adacache_decide``."""
    nodes = list(cached.program().graph_module.graph.nodes)
    kinds = Counter(str(n.target).split(".")[1] for n in nodes if "c10d" in str(n.target))
    decide = next(i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == "adacache_decide")
    return kinds, [i < decide for i, n in enumerate(nodes) if "all_reduce" in str(n.target)]


def tea_config(threshold: float) -> adacache_fx.TeaCacheConfig:
    return adacache_fx.TeaCacheConfig(threshold=threshold, num_steps=NUM_STEPS)


def sensitive_threshold(reduced: float, own: list[float]) -> tuple[float, int]:
    """A threshold halfway between the reduced signal and the farthest rank's own one, and that rank."""
    rank = max(range(len(own)), key=lambda r: abs(own[r] - reduced))
    return (reduced + own[rank]) / 2, rank


def _worker(rank: int, port: int, out_dir: str) -> None:
    with process_group(rank, port):
        model, make_inputs = parallel_model("wan", ulysses_degree=WORLD)
        # each rank's own signal: the reduction stage left out (threshold 0: every step computes, no hang)
        without = tuple(stage for stage in PIPELINE if stage is not reduce_metric)
        with mock.patch("adacache_fx.passes.PIPELINE", without):
            _, own, _, _ = run_config(model, make_inputs, config(0.0))
        _, reduced, _, _ = run_config(model, make_inputs, config(0.0))
        owns = [None] * WORLD
        dist.all_gather_object(owns, float(own[SIGNAL_STEP - 1]))
        threshold, _ = sensitive_threshold(float(reduced[SIGNAL_STEP - 1]), owns)
        result = {"own_signal": own, "own_signals": owns, "reduced_signal": reduced, "threshold": threshold}
        for variant, options in VARIANTS.items():
            outputs, _, computed, cached = run_config(model, make_inputs, config(threshold, **options))
            result[variant] = {"outputs": outputs, "computed": computed}
        # TeaCache: its modulated-input signal, reduced; a threshold 1.5x its mean change skips some steps
        _, tea_signal, _, _ = run_config(model, make_inputs, tea_config(0.0))
        tea_threshold = [1.5 * float(tea_signal[1:].mean())]
        dist.broadcast_object_list(tea_threshold, src=0)
        outputs, _, computed, tea = run_config(model, make_inputs, tea_config(tea_threshold[0]))
        result["teacache"] = {"signal": tea_signal, "threshold": tea_threshold[0], "outputs": outputs,
                              "computed": computed, "collectives": main_graph_collectives(tea)}
        result["collectives"], result["all_reduce_before_decide"] = main_graph_collectives(cached)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks saved (a list indexed by rank)."""
    return spawn(_worker, str(tmp_path_factory.mktemp("parallel_signal")), TIMEOUT_S)


@pytest.fixture(scope="module")
def single(ranks):
    """One process, same weights and inputs: the every-step signal and the sensitive-threshold runs."""
    model, make_inputs = fixtures.build("wan", NUM_LAYERS)
    _, signal, _, _ = run_config(model, make_inputs, config(0.0))
    found = {"signal": signal}
    for variant, options in VARIANTS.items():
        outputs, _, computed, _ = run_config(model, make_inputs, config(ranks[0]["threshold"], **options))
        found[variant] = {"outputs": outputs, "computed": computed}
    return found


def test_reduced_signal_equals_single_process(ranks, single):
    assert torch.isnan(single["signal"][0]) and not single["signal"][1:].isnan().any()
    for result in ranks:
        torch.testing.assert_close(result["reduced_signal"], single["signal"], rtol=1e-5, atol=0, equal_nan=True)


def test_without_reduction_ranks_would_decide_differently(ranks, single):
    own = [float(result["own_signal"][SIGNAL_STEP - 1]) for result in ranks]
    assert own == ranks[0]["own_signals"] == ranks[1]["own_signals"]
    assert abs(own[0] - own[1]) > 1e-3 * abs(own[0])  # each rank sees only its shard of the residual
    threshold = ranks[0]["threshold"]
    assert ranks[1]["threshold"] == threshold
    signal = float(single["signal"][SIGNAL_STEP - 1])
    _, far = sensitive_threshold(signal, own)
    # the reduced signal (a ratio of summed parts) lies between the ranks' own: the threshold splits them
    assert (signal > threshold) != (own[far] > threshold)
    assert (own[0] > threshold) != (own[1] > threshold)
    for variant in VARIANTS:  # one process decides step 2 from the whole signal
        assert (SIGNAL_STEP in single[variant]["computed"]) == (signal > threshold)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ranks_decide_as_one_process(ranks, single, variant):
    want = single[variant]
    assert want["computed"][0] == 1 and len(want["computed"]) < NUM_STEPS  # some step is cached
    for result in ranks:
        got = result[variant]
        assert got["computed"] == want["computed"]
        for out, ref in zip(got["outputs"], want["outputs"], strict=True):
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_teacache_ranks_decide_as_one_process(ranks):
    model, make_inputs = fixtures.build("wan", NUM_LAYERS)
    _, signal, _, _ = run_config(model, make_inputs, tea_config(0.0))
    outputs, _, computed, _ = run_config(model, make_inputs, tea_config(ranks[0]["teacache"]["threshold"]))
    assert computed[0] == 1 and len(computed) < NUM_STEPS  # some step is cached
    for result in ranks:
        got = result["teacache"]
        torch.testing.assert_close(got["signal"], signal, rtol=1e-5, atol=0, equal_nan=True)
        assert got["computed"] == computed
        for out, ref in zip(got["outputs"], outputs, strict=True):
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        kinds, before_decide = got["collectives"]
        # one all-reduce of the signal, before the decision; the first block's all-to-alls run in the
        # cond's compute branch (skipped on cached steps), not in the main graph as under FirstBlockCache
        assert kinds["all_reduce"] == 1 and before_decide == [True] and "all_to_all_single" not in kinds


def test_one_all_reduce_per_step_before_decide(ranks):
    """Wan, 2 blocks, stack: per step the model's output gather and the signal's all-reduce in the main
    graph (the first block's all-to-alls run there too); the all-reduce comes before the decision, and
    ``update`` reuses its result (no second all-reduce)."""
    for result in ranks:
        assert result["collectives"] == {"all_gather_into_tensor": 1, "all_reduce": 1,
                                         "all_to_all_single": 4, "wait_tensor": 6}
        assert result["all_reduce_before_decide"] == [True]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
