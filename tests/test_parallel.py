"""Context parallelism: a tiny Wan under diffusers' Ulysses plan (unmodified) on 2 gloo ranks on CPU.

One spawn of 2 processes runs every scenario (a process start with torch and diffusers is the costly
part); each rank saves what it saw and the tests compare it with one process.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from parallel_helpers import (
    ALWAYS,
    NUM_LAYERS,
    NUM_STEPS,
    WORLD,
    parallel_model,
    process_group,
    rate,
    run,
    sensitive_codebook,
    spawn,
)

import adacache_fx
import adacache_fx.export
from adacache_fx.parallel import ParallelError, context_parallel_group
from adacache_fx.passes import PIPELINE, reduce_metric
from adacache_fx.policies.forecast import ForecastGain

pytest.importorskip("diffusers")
from adacache_fx.tools import fixtures  # noqa: E402

FAMILIES = ("flux", "wan")  # diffusers classes with a _cp_plan: Flux splits at the model's input, Wan at blocks.0
VARIANTS = {  # config options of each case; wan's "stack" last (its graph's collectives are counted)
    "flux": {"stack": {}},
    "wan": {"block": {"granularity": "block"}, "branch": {"granularity": "branch"},
            "forecast": {"extrapolation_order": 1}, "fitted gain": {"extrapolation_order": 1, "forecast_gain": "fit"},
            "per sample": {"batch_decisions": "per_sample"}, "stack": {}},
}
CASES = [(family, variant) for family in FAMILIES for variant in VARIANTS[family]] + [("wan", "transform first")]
TIMEOUT_S = 240  # the whole spawn; each collective times out after 60 s


def run_cfg(model, make_inputs, codebook):
    """Two generations (a reset between), each step calling the model in cache contexts ``cond`` and
    ``uncond`` (zero text). Returns the computed steps per generation and context, and the outputs."""
    cached = adacache_fx.transform(model, adacache_fx.AdaCacheConfig(num_steps=NUM_STEPS, codebook=codebook))
    computed, outputs = [], []
    for _ in range(2):
        adacache_fx.reset(cached)
        for step in range(NUM_STEPS):
            inputs = make_inputs(step)
            with cached.cache_context("cond"):
                outputs.append(cached(**inputs)[0])
            with cached.cache_context("uncond"):
                outputs.append(cached(**{**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"] * 0})[0])
        computed.append({c: adacache_fx.report(cached, c).computed_steps for c in ("cond", "uncond")})
    return computed, outputs


def two_videos(make_inputs):
    """A batch of two: the fixture's video, and one whose latents change a lot between steps (it wants
    every step computed where the first skips)."""
    def inputs(step):
        kwargs = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in make_inputs(step).items()}
        h = kwargs["hidden_states"]
        noise = torch.randn(h[1:].shape, generator=torch.Generator().manual_seed(step), dtype=h.dtype)
        kwargs["hidden_states"] = torch.cat([h[:1], h[1:] + noise.to(h.device)])
        return kwargs
    return inputs


def run_rows(model, make_inputs, codebook):
    """A per-sample generation of a batch: ``(outputs, computed steps of each row)``."""
    cached = adacache_fx.transform(model, adacache_fx.AdaCacheConfig(num_steps=NUM_STEPS, codebook=codebook,
                                                                      batch_decisions="per_sample"))
    outputs = [cached(**make_inputs(step))[0] for step in range(NUM_STEPS)]
    return outputs, [r.computed_steps for r in adacache_fx.report(cached)]


def _gain(cached) -> float | None:
    """The fitted forecast gain after the generation (``forecast_gain="fit"``), else None."""
    state = cached.state()
    return float(state["forecast_gain"]) if "forecast_gain" in state else None


def run_recording_gain_sums(model, make_inputs, codebook, **options):
    """:func:`run`, and the sums ``forecast_gain="fit"`` is fitted from on every step (as the graph
    hands them to ``ForecastGain``: all-reduced under context parallelism)."""
    sums = []
    original = ForecastGain.forward

    def record(module, parts, gain):
        sums.append(parts.detach().clone())
        return original(module, parts, gain)

    with mock.patch.object(ForecastGain, "forward", record):
        outputs, history, computed, cached = run(model, make_inputs, codebook, **options)
    return outputs, computed, cached, torch.stack(sums) if sums else None


def _worker(rank: int, port: int, out_dir: str) -> None:
    with process_group(rank, port):
        result = {}
        for family in FAMILIES:
            model, make_inputs = parallel_model(family, ulysses_degree=WORLD)
            # each rank's own metric: the reduction stage left out (every step computes, so no hang)
            without = tuple(stage for stage in PIPELINE if stage is not reduce_metric)
            with mock.patch("adacache_fx.passes.PIPELINE", without):
                _, own, _, _ = run(model, make_inputs, ALWAYS)
            _, reduced, _, _ = run(model, make_inputs, ALWAYS)
            owns = [None] * WORLD
            dist.all_gather_object(owns, float(own[1]))
            codebook, _ = sensitive_codebook(float(reduced[1]), owns)
            result[family] = {"own_metric": own, "reduced_metric": reduced, "codebook": codebook}
            for variant, options in VARIANTS[family].items():
                outputs, computed, cached, sums = run_recording_gain_sums(model, make_inputs, codebook, **options)
                result[family, variant] = {"outputs": outputs, "computed": computed, "gain": _gain(cached),
                                           "gain_sums": sums}
        gm = cached.program().graph_module  # the last case: wan, stack granularity
        from diffusers import ContextParallelConfig

        plain, _ = fixtures.build("wan", NUM_LAYERS)
        outputs, _, computed, _ = run(plain, make_inputs, codebook, ContextParallelConfig(ulysses_degree=WORLD))
        result["wan", "transform first"] = {"outputs": outputs, "computed": computed}
        result["cfg"] = run_cfg(model, make_inputs, codebook)
        result["rows"] = run_rows(model, two_videos(make_inputs), codebook)
        model16, inputs16 = parallel_model("wan", dtype=torch.bfloat16, ulysses_degree=WORLD)
        _, metric, _, _ = run(model16, inputs16, ALWAYS)
        codebook16 = {2 * float(metric[1]): 3, 1e9: 1}  # the reduced metric: the same on both ranks
        outputs, _, computed, _ = run(model16, inputs16, codebook16)
        result["bf16"] = {"metric": metric, "codebook": codebook16, "outputs": outputs, "computed": computed}
        result["collectives"] = {name: Counter(str(n.target).split(".")[1] for n in graph.nodes if "c10d" in str(n.target))
                                 for name, graph in (("main", gm.graph), ("compute", gm.adacache_region0_compute.graph))}
        errors = result["errors"] = {}
        try:
            adacache_fx.export.to_onnx(cached, make_inputs(0), os.path.join(out_dir, f"rank{rank}.onnx"))
        except ValueError as error:
            errors["onnx"] = str(error)
        model, make_inputs = parallel_model("wan", ring_degree=WORLD)
        try:
            adacache_fx.transform(model)(**make_inputs(0))
        except ParallelError as error:
            errors["ring"] = str(error)
        model, make_inputs = parallel_model("wan", ulysses_degree=WORLD)
        inputs = make_inputs(0)
        if rank == 1:
            inputs["hidden_states"] = torch.cat([inputs["hidden_states"]] * 2, dim=-1)
        try:
            adacache_fx.transform(model)(**inputs)
        except ParallelError as error:
            errors["shapes"] = str(error)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks saved (a list indexed by rank)."""
    return spawn(_worker, str(tmp_path_factory.mktemp("parallel")), TIMEOUT_S)


@pytest.fixture(scope="module")
def single(ranks):
    """One process, same weights and inputs: the always-compute metric and the sensitive-codebook runs."""
    found = {}
    for family in FAMILIES:
        model, make_inputs = fixtures.build(family, NUM_LAYERS)
        _, found[family], _, _ = run(model, make_inputs, ALWAYS)
        for variant, options in VARIANTS[family].items():
            outputs, computed, cached, sums = run_recording_gain_sums(model, make_inputs, ranks[0][family]["codebook"],
                                                                      **options)
            found[family, variant] = {"outputs": outputs, "computed": computed, "gain": _gain(cached),
                                      "gain_sums": sums}
    found["wan", "transform first"] = found["wan", "stack"]
    sums = found["wan", "fitted gain"]["gain_sums"]
    assert sums.shape == (NUM_STEPS, 2) and bool((sums[[4, 5], 1] > 0).all())  # fitted on steps 5 and 6
    found["cfg"] = run_cfg(model, make_inputs, ranks[0]["wan"]["codebook"])
    found["rows"] = run_rows(model, two_videos(make_inputs), ranks[0]["wan"]["codebook"])
    return found


def test_bf16_ranks_decide_as_one_process(ranks):
    model, make_inputs = fixtures.build("wan", NUM_LAYERS, dtype=torch.bfloat16)
    _, metric, _, _ = run(model, make_inputs, ALWAYS)
    assert ranks[0]["bf16"]["codebook"] == ranks[1]["bf16"]["codebook"]
    outputs, _, computed, _ = run(model, make_inputs, ranks[0]["bf16"]["codebook"])
    assert computed == [1, 2, 5, 6]
    for result in ranks:
        torch.testing.assert_close(result["bf16"]["metric"], metric, rtol=1e-2, atol=0, equal_nan=True)
        assert result["bf16"]["computed"] == computed
        for out, ref in zip(result["bf16"]["outputs"], outputs):
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_metric_equals_single_process(ranks, single, family):
    for result in ranks:
        torch.testing.assert_close(result[family]["reduced_metric"], single[family], rtol=1e-5, atol=0, equal_nan=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_reduction_ranks_would_decide_differently(ranks, single, family):
    own = [float(result[family]["own_metric"][1]) for result in ranks]
    assert abs(own[0] - own[1]) > 1e-3 * abs(own[0])  # each rank sees only its shard of the residual
    codebook = ranks[0][family]["codebook"]
    assert ranks[1][family]["codebook"] == codebook
    metric = float(single[family][1])
    _, rank = sensitive_codebook(metric, own)
    assert rate(codebook, metric) == 3 and rate(codebook, own[rank]) == 1


@pytest.mark.parametrize("family, variant", CASES)
def test_ranks_decide_as_one_process(ranks, single, family, variant):
    want = single[family, variant]
    assert want["computed"] == [1, 2, 5, 6]  # the codebook's rate 3 after step 2 skips steps 3 and 4
    for result in ranks:
        got = result[family, variant]
        assert got["computed"] == want["computed"]
        if want.get("gain_sums") is not None:  # the fitted gain's sums are all-reduced: the whole sequence's
            torch.testing.assert_close(got["gain_sums"], want["gain_sums"], rtol=1e-4, atol=1e-6)
            assert got["gain"] == pytest.approx(want["gain"], abs=1e-5)
        for out, ref in zip(got["outputs"], want["outputs"]):
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_cache_contexts_and_reset_decide_as_one_process(ranks, single):
    want_computed, want_outputs = single["cfg"]
    assert want_computed[0] == want_computed[1]  # a reset starts the same generation again
    for result in ranks:
        computed, outputs = result["cfg"]
        assert computed == want_computed
        for out, ref in zip(outputs, want_outputs):
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_per_sample_rows_of_a_batch_decide_as_one_process(ranks, single):
    """Per-sample decisions of a batch of two under context parallelism: each row's metric is reduced over
    the ranks on its own, so every rank computes each row's steps as one process does."""
    want_outputs, want_computed = single["rows"]
    assert want_computed[0] == [1, 2, 5, 6] and want_computed[1] != want_computed[0]
    for result in ranks:
        outputs, computed = result["rows"]
        assert computed == want_computed
        for out, ref in zip(outputs, want_outputs):
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_one_all_reduce_per_step_added(ranks):
    """Wan, 2 blocks, stack: per step the model's output gather and the metric's all-reduce in the main
    graph; per compute step the model's all-to-alls (q, k, v and out of each self-attention)."""
    for result in ranks:
        assert result["collectives"]["main"] == {"all_gather_into_tensor": 1, "all_reduce": 1, "wait_tensor": 2}
        assert result["collectives"]["compute"] == {"all_to_all_single": 8, "wait_tensor": 8}


def test_unsupported_setups_are_refused(ranks):
    for result in ranks:
        errors = result["errors"]
        assert "context parallelism is not supported" in errors["onnx"]
        assert "ring_degree=2" in errors["ring"] and "log-sum-exp" in errors["ring"]
        assert "different inputs" in errors["shapes"] and "(1, 4, 2, 8, 16)" in errors["shapes"]


class _SplitInFirstBlock(torch.nn.Module):
    """A residual stack whose first block starts by taking the first half of the sequence, as the
    rank's slice of a context-parallel split hook on ``blocks.0`` is recorded in that block's scope."""

    class Block(torch.nn.Module):
        def __init__(self, split: bool):
            super().__init__()
            self.split, self.mlp = split, torch.nn.Linear(8, 8)

        def forward(self, x):
            if self.split:
                x = x.chunk(2, dim=1)[0]
            return x + self.mlp(x)

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([self.Block(i == 0) for i in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_a_split_at_the_first_block_is_glue_before_it():
    torch.manual_seed(0)
    model = _SplitInFirstBlock().eval()
    x = torch.randn(1, 6, 8)
    config = adacache_fx.AdaCacheConfig(num_steps=3, compute_steps=(1,))
    cached = adacache_fx.transform(model, config)
    assert torch.equal(cached(x), model(x))  # step 1 computes
    assert cached.program().rewrite.regions == ["blocks.0..blocks.2"]  # one region: the split stays outside
    x2 = x + 0.1
    residual = model(x) - x.chunk(2, dim=1)[0]
    torch.testing.assert_close(cached(x2), x2.chunk(2, dim=1)[0] + residual)  # cached: this step's slice + residual


def test_parallel_model_without_process_group_is_refused():
    model = torch.nn.Linear(2, 2)
    model._parallel_config = mock.Mock(context_parallel_config=mock.Mock(ring_degree=1))
    assert not dist.is_initialized()
    with pytest.raises(ParallelError, match="not initialized"):
        context_parallel_group(model)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
