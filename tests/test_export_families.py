"""Every fixture family (twelve) transformed with a mixed schedule, exported with ``to_onnx`` and run in ONNX
Runtime's CPU provider for a whole generation: the same computed steps as torch, outputs within 1e-5."""

import pytest
import torch

import adacache_fx as ax
from adacache_fx.export import OnnxRunner, read_metadata, to_onnx
from adacache_fx.export.prepare import graph_modules
from adacache_fx.tools.fixtures import build
from adacache_fx.tools.fixtures.families import FAMILIES

STEPS = 8
#: Reuse for 3 steps below a rate of change 0.25, 2 below 0.45: mixed schedules on every family (0.08..0.5).
CODEBOOK = {0.25: 3, 0.45: 2, 1.0: 1}
#: What the export-preparation stages must rewrite for a family to load in ONNX Runtime.
PREPARED = {"allegro": {"squeeze_dims": 3}, "pixart": {"squeeze_dims": 1}, "hunyuan_video": {"where_dtypes": 1}}
REWRITTEN = {torch.ops.aten.squeeze.dim, torch.ops.aten.masked_fill.Scalar}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_and_runs_in_onnx_runtime_like_torch(family, tmp_path):
    model, make_inputs = build(family, num_layers=2)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=STEPS, codebook=CODEBOOK, granularity="block"))
    info = to_onnx(cached, make_inputs(0), tmp_path / f"{family}.onnx")
    counts = {stage: int(summary.split()[0]) for stage, summary in info.prepared.items()}
    assert counts == {"squeeze_dims": 0, "where_dtypes": 0, **PREPARED.get(family, {})}
    assert info.validated == ("onnx.checker", "shape inference", "onnxruntime CPUExecutionProvider")
    assert read_metadata(info.path)["prepared"] == info.prepared
    if family in PREPARED:  # rewritten for ONNX on a copy: the torch program keeps its own ops
        graph = cached.prepare_call((), make_inputs(0))[0].graph_module
        kept = sum(n.target in REWRITTEN for m in graph_modules(graph) for n in m.graph.nodes)
        assert kept >= sum(PREPARED[family].values())
    runner = OnnxRunner(info.path)
    ax.reset(cached, num_steps=STEPS)
    with torch.no_grad():
        for s in range(STEPS):
            expected, got = cached(**make_inputs(s))[0], runner(**make_inputs(s))[0]
            assert got.dtype == expected.dtype == torch.float32
            assert float((got - expected).abs().max()) < 1e-5, f"step {s + 1}"
    torch_report, onnx_report = ax.report(cached), runner.report()
    assert onnx_report.computed_steps == torch_report.computed_steps
    assert 2 < torch_report.num_computed < STEPS  # a mixed schedule: both branches ran
    assert [r["rate"] for r in onnx_report.steps] == [r["rate"] for r in torch_report.steps]
    assert info.num_if_nodes == len(torch_report.regions) >= 2  # one If per block (Latte: 4, spatial and temporal)


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "flux"])
def test_float16_files_run_in_onnx_runtime_cpu(family, tmp_path):
    """float16 weights and inputs: ONNX Runtime's CPU provider runs the file; the schedule is torch's, the outputs
    within float16 rounding (every family runs this way; three here to keep the suite fast). bfloat16 files are
    refused at export (tests/test_export_validate.py)."""
    model, make_inputs = build(family, num_layers=2, dtype=torch.float16)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=STEPS, codebook=CODEBOOK, granularity="block"))
    runner = OnnxRunner(to_onnx(cached, make_inputs(0), tmp_path / f"{family}.onnx").path)
    ax.reset(cached, num_steps=STEPS)
    with torch.no_grad():
        for s in range(STEPS):
            expected, got = cached(**make_inputs(s))[0], runner(**make_inputs(s))[0]
            assert got.dtype == expected.dtype == torch.float16
            assert float((got.float() - expected.float()).abs().max() / expected.float().abs().max()) < 5e-3
    assert runner.report().computed_steps == ax.report(cached).computed_steps
    assert 2 < ax.report(cached).num_computed < STEPS
