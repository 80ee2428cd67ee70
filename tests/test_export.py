"""ONNX export: one If node per cached region, whole generations through ONNX Runtime equal to torch
(schedule, outputs, state), skipped work on cached steps, cache contexts, errors (TensorRT: test_tensorrt_*.py)."""

import argparse
import contextlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

import adacache_fx as ax
from adacache_fx.export import OnnxRunner, TensorRTRunner, build_tensorrt_engine, to_onnx
from adacache_fx.tools.export_cli import add_export_arguments, build_model, cli_export
from adacache_fx.tools.fixtures import build

STEPS = 30
# Codebooks that give mixed schedules on these tiny models (checked below: some steps cached, some computed).
CASES = {  # name: (family, config)
    "wan": ("wan", ax.AdaCacheConfig(num_steps=STEPS, codebook=ax.presets.FAST_30)),  # exported with the CLI
    "cogvideox": ("cogvideox", ax.AdaCacheConfig(num_steps=STEPS, codebook={0.15: 3, 0.25: 2, 1.0: 1},
                                                 granularity="block")),
    "latte": ("latte", ax.AdaCacheConfig(num_steps=STEPS, codebook={0.1: 4, 0.2: 2, 1.0: 1}, granularity="block")),
    "wan-extrapolated": ("wan", ax.AdaCacheConfig(num_steps=STEPS, codebook=ax.presets.FAST_30,
                                                  extrapolation_order=1)),
}
MATMULS = {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulNBits"}


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_export(add_export_arguments(argparse.ArgumentParser()).parse_args(list(argv)))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name) -> (path, cached, make_inputs, cli_output)``, each case exported once.

    ``cached`` is the torch CachedModel with the same config (reset to a new generation of STEPS
    steps), captured once for all tests."""
    folder, done = tmp_path_factory.mktemp("onnx"), {}

    def get(name):
        if name not in done:
            family, config = CASES[name]
            model, make_inputs = build(family, num_layers=2)
            cached, path, output = ax.transform(model, config), folder / f"{name}.onnx", None
            if name == "wan":  # the CLI's built-in tiny Wan is this very model
                code, output = _cli("--model", "wan", "--layers", "2", "--steps", str(STEPS), "--out", str(path))
                assert code == 0, output
                builtin, _ = build_model("wan", 2)
                assert all(torch.equal(a, b) for a, b in zip(builtin.state_dict().values(), model.state_dict().values()))
            else:
                to_onnx(cached, make_inputs(0), path)  # captures it: the tests reuse the capture
            done[name] = (path, cached, make_inputs, output)
        ax.reset(done[name][1], num_steps=STEPS)
        return done[name]

    return get


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _assert_same_state(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize("name", list(CASES))
def test_generation_through_onnx_runtime_equals_torch(name, exported):
    path, cached, make_inputs, _ = exported(name)
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path)).graph
    ops = Counter(node.op_type for node in graph.node)
    runner = OnnxRunner(path)
    with torch.no_grad():
        for s in range(STEPS):
            expected, got = cached(**make_inputs(s))[0], runner(**make_inputs(s))[0]
            assert _rel(got, expected) < 1e-4, f"step {s + 1}"
            if s in (0, 1, 12, STEPS - 1):
                _assert_same_state(runner.state(), cached.state())
    torch_report, onnx_report = ax.report(cached), runner.report()
    assert ops["If"] == len(torch_report.regions) == len(runner.metadata["regions"])
    assert not any(node.domain.startswith("adacache") for node in graph.node)  # the layout barrier is gone
    assert onnx_report.computed_steps == torch_report.computed_steps
    assert 4 <= torch_report.num_computed <= STEPS - 6  # a mixed schedule: both branches ran
    assert [r["rate"] for r in onnx_report.steps] == [r["rate"] for r in torch_report.steps]
    assert onnx_report.cache_bytes == torch_report.cache_bytes


def test_state_round_trips_and_steps_change(exported):
    path, cached, make_inputs, _ = exported("wan")
    runner = OnnxRunner(path)
    with torch.no_grad():
        for s in range(10):
            cached(**make_inputs(s))
        runner.load_state(cached.state())  # continue a torch generation in ONNX Runtime
        for s in range(10, STEPS):
            assert _rel(runner(**make_inputs(s))[0], cached(**make_inputs(s))[0]) < 1e-4
    _assert_same_state(runner.state(), cached.state())
    assert runner.report().computed_steps == ax.report(cached).computed_steps

    ax.reset(cached, num_steps=20)  # the history rows follow N: no re-export for another step count
    runner.reset(num_steps=20)
    with torch.no_grad():
        for s in range(20):
            assert _rel(runner(**make_inputs(s))[0], cached(**make_inputs(s))[0]) < 1e-4
    assert runner.report().num_steps == 20
    assert runner.report().computed_steps == ax.report(cached).computed_steps


def test_cached_step_skips_the_block_stack(exported, tmp_path):
    """ONNX Runtime's profile lists the kernels that ran: cached steps run no matmul of the blocks."""
    path, _, make_inputs, _ = exported("wan")
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    runner = OnnxRunner(path, session_options=options)
    for s in range(STEPS):
        runner(**make_inputs(s))
    events = json.loads(Path(runner.session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    assert len(runs) == STEPS
    matmuls = [0] * STEPS
    for e in events:
        if e.get("cat") == "Node" and e["args"].get("op_name") in MATMULS:
            matmuls[next(i for i, (a, b) in enumerate(runs) if a <= e["ts"] <= b)] += 1
    computed = set(runner.report().computed_steps)
    full = {matmuls[s - 1] for s in computed}
    cached = {m for s, m in enumerate(matmuls, 1) if s not in computed}
    assert len(full) == 1 and len(cached) == 1, matmuls  # every step of a kind runs the same kernels
    assert 0 < cached.pop() < full.pop() / 3


def test_cache_contexts_keep_separate_state(exported):
    path, cached, make_inputs, _ = exported("wan")
    runner = OnnxRunner(path)

    def uncond(s):
        kwargs = make_inputs(s)
        kwargs["encoder_hidden_states"] = torch.zeros_like(kwargs["encoder_hidden_states"])
        return kwargs

    with torch.no_grad():
        for s in range(STEPS):
            for name, inputs in (("cond", make_inputs), ("uncond", uncond)):
                with cached.cache_context(name), runner.cache_context(name):
                    assert _rel(runner(**inputs(s))[0], cached(**inputs(s))[0]) < 1e-4
    for name in ("cond", "uncond"):
        _assert_same_state(runner.state(name), cached.state(name))
        assert runner.report(name).computed_steps == ax.report(cached, name).computed_steps
    assert not torch.equal(runner.state("cond")["cache_0_0"], runner.state("uncond")["cache_0_0"])
    with pytest.raises(RuntimeError, match="no generation"):
        runner.report()  # nothing ran in the default context


def test_clear_errors(exported, tmp_path):
    path, cached, make_inputs, _ = exported("wan")
    with pytest.raises(TypeError, match=r"adacache_fx\.transform"):
        to_onnx(cached.model, make_inputs(0), tmp_path / "plain.onnx")
    runner = OnnxRunner(path)
    with pytest.raises(ValueError, match=r"state tensor 'cache_0_0': expected shape \(1, 32, 32\) dtype float32, got"):
        runner.load_state({"cache_0_0": torch.zeros(1, 32, 31)})
    with pytest.raises(ValueError, match=r"state tensor 'step': expected shape \(\) dtype int64, got"):
        runner.load_state({"step": torch.tensor(0.0)})
    bad = make_inputs(0)
    bad["hidden_states"] = bad["hidden_states"][..., :4]
    with pytest.raises(ValueError, match=r"input 'hidden_states': expected shape \(1, 4, 2, 8, 8\) dtype float32"):
        runner(**bad)
    with pytest.raises(ValueError, match="return_dict"):
        runner(**{**make_inputs(0), "return_dict": True})
    with pytest.raises(ValueError, match="exported for the inputs"):
        runner(hidden_states=make_inputs(0)["hidden_states"])


def test_cli_prints_stages(exported):
    _, _, _, output = exported("wan")
    for stage in ("build model", "capture + rewrite", "torch.export", "ONNX translation", "onnx.checker",
                  "ORT session + one step", "1 If node"):
        assert stage in output
    assert "max relative error" in output


def test_cli_exports_the_bundled_reference_model(tmp_path):
    """``--model reference``: the bundled model with its caption keywords (a HunyuanVideo needs the mask and
    the pooled embedding), one If over the whole stack, ONNX Runtime within float rounding of torch."""
    code, output = _cli("--model", "reference", "--out", str(tmp_path / "reference.onnx"))
    assert code == 0 and (tmp_path / "reference.onnx").is_file(), output
    assert "1 If node(s) for regions ['transformer_blocks.0..single_transformer_blocks.3']" in output
    error = float(re.search(r"max relative error ([0-9.e+-]+)", output).group(1))
    assert error < 1e-4


def test_cli_reference_without_weights_says_how_to_get_them(tmp_path):
    code, output = _cli("--model", "reference", "--weights", str(tmp_path), "--out", str(tmp_path / "unused.onnx"))
    assert code == 2 and "train_reference.py" in output and "transformer.safetensors" in output
    assert not (tmp_path / "unused.onnx").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a CUDA device")
def test_tensorrt_without_cuda_says_what_is_missing(tmp_path):
    with pytest.raises(RuntimeError, match=r"CUDA device.*pip install adacache-fx\[gpu\]"):
        build_tensorrt_engine(tmp_path / "model.onnx", tmp_path / "model.engine")
    with pytest.raises(RuntimeError, match="CUDA device"):
        TensorRTRunner(tmp_path / "model.engine")
    code, output = _cli("--format", "tensorrt", "--out", str(tmp_path / "model.engine"))
    assert code == 2 and "pip install adacache-fx[gpu]" in output  # said before any slow stage
