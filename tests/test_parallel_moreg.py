"""Context parallelism, continued: MoReg, ring attention, and ``adacache_fx.enable`` on a pipeline, on 2
gloo ranks.

A tiny Wan under diffusers' Ulysses plan (unmodified); one spawn of 2 processes runs every scenario and
each rank saves what it saw for the tests to compare with one process.

MoReg: 3 latent frames of 16 tokens, 24 tokens per rank, so rank 1 starts in the middle of frame 1 and
most frame pairs straddle the two chunks. Stride 1 takes the 16 tokens before rank 1's chunk from rank
0's tail; strides (1, 2) need 32, more than a chunk: all of rank 0's.

Ring attention needs an attention returning the log-sum-exp. diffusers' ``_native_flash`` backend
(``supports_context_parallel``) calls ``aten::_scaled_dot_product_flash_attention``, which has no CPU
kernel; the ranks register one (:func:`cpu_flash_attention`, from torch's own CPU flash attention, which
returns it) and run the Wan with ``ring_degree=2`` on that backend. Nothing in adacache_fx is specific to it.
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
    three_frames,
)

import adacache_fx
from adacache_fx.parallel import SequenceShard
from adacache_fx.policies.adacache import MotionMagnitude

pytest.importorskip("diffusers")
from adacache_fx.tools import fixtures  # noqa: E402

STRIDES = {"tail": (1,), "whole chunk": (1, 2)}
TIMEOUT_S = 240
PIPE_CALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 10, "output_type": "pt"}


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


def cpu_flash_attention():
    """Give ``aten::_scaled_dot_product_flash_attention`` a CPU kernel (this process only): torch's
    ``_scaled_dot_product_flash_attention_for_cpu``, which returns the output and its log-sum-exp."""
    def flash(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                           scale=scale)
        empty = query.new_empty(0)
        seqs = torch.empty(0, dtype=torch.int64)
        return out, lse, seqs, seqs, query.shape[2], key.shape[2], seqs, seqs, empty

    library = torch.library.Library("aten", "IMPL")
    library.impl("_scaled_dot_product_flash_attention", flash, "CPU")
    return library  # the kernel lives as long as this


def ring_run(make_inputs, codebook):
    """The MoReg stride-1 run under ring attention (``ring_degree=2``, the ``_native_flash`` backend)."""
    from diffusers import ContextParallelConfig

    model, _ = fixtures.build("wan", 2)
    model.set_attention_backend("_native_flash")
    with cpu_device_count():
        model.enable_parallelism(config=ContextParallelConfig(ring_degree=WORLD))
    moreg = adacache_fx.MoRegConfig(strides=STRIDES["tail"])
    _, metric, _, _ = run(model, make_inputs, ALWAYS, moreg=moreg)
    outputs, _, computed, _ = run(model, make_inputs, codebook, moreg=moreg)
    return {"metric": metric, "outputs": outputs, "computed": computed}


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
        kernel = cpu_flash_attention()  # noqa: F841 - registered while it lives
        result["ring"] = ring_run(three_frames(make_inputs), result["moreg"]["tail"]["codebook"])
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


@pytest.mark.parametrize("world, frames, strides", [(2, 3, (1,)), (2, 3, (1, 2)), (4, 5, (1, 3)), (3, 4, (2, 1))])
def test_sharded_motion_parts_add_up_to_one_process(world, frames, strides):
    """No processes: the all-gather replaced by the chunks' tails. Chunks that start inside a frame,
    halos of one chunk's tail and of several whole chunks."""
    torch.manual_seed(0)
    p = torch.randn(2, frames * 12, 8)
    chunks = p.chunk(world, dim=1)

    class Collectives:  # all_gather_into_tensor: every rank's tail, rank after rank along dim 0
        @staticmethod
        def all_gather_into_tensor(tail, group_size, group_name):
            return torch.cat([c.reshape(2, -1)[:, c[0].numel() - tail.shape[1]:] for c in chunks])

        @staticmethod
        def wait_tensor(tensor):
            return tensor

    with mock.patch("adacache_fx.parallel.c10d", Collectives):
        parts = sum(MotionMagnitude(2, frames, strides, SequenceShard("g", rank, world))(chunk)
                    for rank, chunk in enumerate(chunks))
    torch.testing.assert_close(parts, MotionMagnitude(2, frames, strides)(p), rtol=1e-6, atol=1e-4)


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


def test_ring_attention_ranks_decide_as_one_process(ranks, single):
    """Ring attention (``ring_degree=2``), MoReg stride 1, the sensitive codebook of the Ulysses run: the
    metric, the computed steps and the outputs of one process (which runs the ``native`` attention)."""
    want = single["tail"]
    for result in ranks:
        got = result["ring"]
        torch.testing.assert_close(got["metric"], want["metric"], rtol=1e-5, atol=0, equal_nan=True)
        assert got["computed"] == want["computed"] == [1, 2, 5, 6]
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
