"""torch.compile(fullgraph=True) of a transformed model under context parallelism, on each of 2 gloo ranks.

A tiny Wan under diffusers' Ulysses plan (unmodified), with MoReg, so the compiled graph holds the
model's all-to-alls and gather, the metric's all-reduce (main graph) and MoReg's all-gather (compute
branch). Backend ``aot_eager``: Dynamo traces the whole call into one graph (``fullgraph=True``; a
graph break would raise) and AOTAutograd traces it again through the functional collectives, without
Inductor's code generation (about 80 s per rank on this CPU; tried by hand, see the README).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch._dynamo.testing
from parallel_helpers import NUM_STEPS, WORLD, parallel_model, process_group, spawn, three_frames

import adacache_fx

pytest.importorskip("diffusers")

TIMEOUT_S = 240
CONFIG = {"num_steps": NUM_STEPS, "codebook": {1e9: 3}, "moreg": adacache_fx.MoRegConfig()}  # steps 1, 2, 5, 6


def generation(model, make_inputs):
    with torch.no_grad():
        return [model(**make_inputs(step))[0] for step in range(NUM_STEPS)]


def _worker(rank: int, port: int, out_dir: str) -> None:
    with process_group(rank, port):
        model, make_inputs = parallel_model("wan", ulysses_degree=WORLD)
        make_inputs = three_frames(make_inputs)
        eager = adacache_fx.transform(model, adacache_fx.AdaCacheConfig(**CONFIG))
        expected = generation(eager, make_inputs)
        cached = adacache_fx.transform(model, adacache_fx.AdaCacheConfig(**CONFIG))
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(cached, backend=counter, fullgraph=True)
        got = generation(compiled, make_inputs)
        torch.save({
            "frames": counter.frame_count,
            "graph_breaks": dict(torch._dynamo.utils.counters["graph_break"]),
            "collectives": {str(node.target).split(".")[1] for graph in counter.graphs for module in graph.modules()
                            if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes
                            if str(node.target).startswith("_c10d_functional.")},
            "computed": (adacache_fx.report(eager).computed_steps, adacache_fx.report(cached).computed_steps),
            "max_diff": max(float((a - b).abs().max()) for a, b in zip(got, expected)),
        }, os.path.join(out_dir, f"rank{rank}.pt"))


def test_fullgraph_compile_on_each_rank_equals_eager(tmp_path):
    """1 frame, 0 graph breaks and the eager schedule on both ranks, outputs within 1e-5 of eager."""
    for result in spawn(_worker, str(tmp_path), TIMEOUT_S):
        assert result["frames"] == 1 and result["graph_breaks"] == {}
        eager, compiled = result["computed"]
        assert eager == compiled == [1, 2, 5, 6]
        assert result["max_diff"] <= 1e-5
        # Dynamo's graph (cond branches as subgraphs): the model's, the metric's, MoReg's collectives
        assert result["collectives"] == {"all_to_all_single", "all_gather_into_tensor", "all_reduce", "wait_tensor"}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
