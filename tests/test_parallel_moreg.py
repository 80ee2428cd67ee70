"""Context parallelism, continued: MoReg, and ``adacache_fx.enable`` on a pipeline, on 2 gloo ranks.

A tiny Wan under diffusers' Ulysses plan (unmodified); one spawn of 2 processes runs every scenario and
each rank saves what it saw for the tests to compare with one process.

MoReg: 3 latent frames of 16 tokens, 24 tokens per rank, so rank 1 starts in the middle of frame 1 and
most frame pairs straddle the two chunks. Stride 1 takes the 16 tokens before rank 1's chunk from rank
0's tail; strides (1, 2) need 32, more than a chunk: all of rank 0's.
"""

from __future__ import annotations

import os
import sys
from unittest import mock

import pytest
import torch
from parallel_helpers import (
    ALWAYS,
    NUM_STEPS,
    WORLD,
    cpu_device_count,
    parallel_model,
    process_group,
    rate,
    run,
    sensitive_codebook,
    spawn,
)

import adacache_fx

pytest.importorskip("diffusers")
from adacache_fx.tools import fixtures  # noqa: E402

STRIDES = {"tail": (1,), "whole chunk": (1, 2)}
TIMEOUT_S = 240
PIPE_CALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 10, "output_type": "pt"}


def three_frames(make_inputs):
    """The fixture's inputs with a third latent frame (the second, shifted: some motion)."""
    def inputs(step):
        kwargs = make_inputs(step)
        h = kwargs["hidden_states"]
        return {**kwargs, "hidden_states": torch.cat([h, h[:, :, 1:].roll(2, dims=-1)], dim=2)}
    return inputs


def no_halo(x, shard, needed):
    """In place of :func:`adacache_fx.parallel.preceding`: nothing from the other ranks (the frame pairs
    that straddle two chunks are left out)."""
    return x[:, :0]


def moreg_runs(model, make_inputs):
    """Per stride set: the metric with and without the straddling pairs (every step computes), a codebook
    whose threshold lies between them, and the run under it."""
    found = {}
    for name, strides in STRIDES.items():
        moreg = adacache_fx.MoRegConfig(strides=strides)
        with mock.patch("adacache_fx.policies.adacache.preceding", no_halo):
            _, without, _, _ = run(model, make_inputs, ALWAYS, moreg=moreg)
        _, metric, _, _ = run(model, make_inputs, ALWAYS, moreg=moreg)
        codebook, _ = sensitive_codebook(float(metric[1]), [float(without[1])])
        outputs, _, computed, _ = run(model, make_inputs, codebook, moreg=moreg)
        found[name] = {"without": without, "metric": metric, "codebook": codebook, "outputs": outputs,
                       "computed": computed}
    return found


def generate(pipe, parallel: bool):
    """One CFG generation of the tiny WanPipeline with caching: the frames and each context's computed steps."""
    if parallel:
        from diffusers import ContextParallelConfig

        with cpu_device_count():
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    pipe.set_progress_bar_config(disable=True)
    cached = adacache_fx.enable(pipe)
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    frames = pipe(prompt_embeds=embeds, negative_prompt_embeds=-embeds, generator=torch.Generator().manual_seed(2),
                  **PIPE_CALL).frames
    computed = {c: adacache_fx.report(cached, c).computed_steps for c in ("cond", "uncond")}
    return frames, computed


def _worker(rank: int, port: int, out_dir: str) -> None:
    with process_group(rank, port):
        model, make_inputs = parallel_model("wan", ulysses_degree=WORLD)
        result = {"moreg": moreg_runs(model, three_frames(make_inputs)),
                  "pipe": generate(fixtures.tiny_wan_pipeline(), parallel=True)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks saved (a list indexed by rank)."""
    return spawn(_worker, str(tmp_path_factory.mktemp("parallel_moreg")), TIMEOUT_S)


@pytest.fixture(scope="module")
def single(ranks):
    """One process, same weights and inputs (the codebooks the ranks chose)."""
    model, make_inputs = fixtures.build("wan", 2)
    make_inputs = three_frames(make_inputs)
    found = {}
    for name, strides in STRIDES.items():
        moreg = adacache_fx.MoRegConfig(strides=strides)
        _, metric, _, _ = run(model, make_inputs, ALWAYS, moreg=moreg)
        outputs, _, computed, _ = run(model, make_inputs, ranks[0]["moreg"][name]["codebook"], moreg=moreg)
        found[name] = {"metric": metric, "outputs": outputs, "computed": computed}
    found["pipe"] = generate(fixtures.tiny_wan_pipeline(), parallel=False)
    return found


@pytest.mark.parametrize("strides", STRIDES)
def test_moreg_metric_equals_single_process(ranks, single, strides):
    for result in ranks:
        torch.testing.assert_close(result["moreg"][strides]["metric"], single[strides]["metric"], rtol=1e-5, atol=0,
                                   equal_nan=True)


@pytest.mark.parametrize("strides", STRIDES)
def test_without_the_straddling_pairs_the_decision_would_differ(ranks, single, strides):
    """The codebook's threshold lies between the metric with and without the frame pairs that straddle
    the two chunks: leaving them out changes the rate after step 2."""
    metric = float(single[strides]["metric"][1])
    for result in ranks:
        got = result["moreg"][strides]
        assert got["codebook"] == ranks[0]["moreg"][strides]["codebook"]
        without = float(got["without"][1])
        assert abs(without - metric) > 1e-3 * abs(metric)
        assert rate(got["codebook"], metric) == 3 and rate(got["codebook"], without) == 1


@pytest.mark.parametrize("strides", STRIDES)
def test_moreg_ranks_decide_as_one_process(ranks, single, strides):
    want = single[strides]
    assert want["computed"] == [1, 2, 5, 6]  # the codebook's rate 3 after step 2 skips steps 3 and 4
    assert len(want["outputs"]) == NUM_STEPS
    for result in ranks:
        got = result["moreg"][strides]
        assert got["computed"] == want["computed"]
        for out, ref in zip(got["outputs"], want["outputs"]):
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_enable_on_a_parallel_pipeline_generates_as_one_process(ranks, single):
    """``adacache_fx.enable(pipe)`` on a WanPipeline whose transformer runs under Ulysses: every rank
    computes the steps one process computes, in both CFG contexts, and decodes the same frames."""
    want_frames, want_computed = single["pipe"]
    assert len(want_computed["cond"]) < PIPE_CALL["num_inference_steps"]  # it caches
    for frames, computed in (result["pipe"] for result in ranks):
        assert computed == want_computed
        torch.testing.assert_close(frames, want_frames, rtol=0, atol=1e-5)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
