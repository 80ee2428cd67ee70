"""scripts/gpu_check.sh / python -m adacache_fx.tools.gpu_check: a clear message without a GPU, and
the whole check run on CPU against the stand-ins (tests/standins), so its first GPU run is not its first run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adacache_fx import backends
from adacache_fx.export import tensorrt as export_tensorrt
from adacache_fx.tools import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_script_without_a_gpu_says_so():
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "needs a CUDA device" in done.stderr and "adacache-fx[gpu]" in done.stderr


def test_missing_packages_are_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    assert gpu_check.main(["--device", "cpu"]) == 2
    assert "tensorrt, torch_tensorrt not installed" in capsys.readouterr().err


def test_whole_check_on_stand_ins(fake_tensorrt, fake_torch_tensorrt, monkeypatch, capsys):
    trt = fake_tensorrt("11.0.0")
    # Only the CUDA checks see the stand-ins (torch.export must not believe CUDA is there).
    monkeypatch.setattr(backends, "_import_torch_tensorrt", lambda: fake_torch_tensorrt)
    monkeypatch.setattr(export_tensorrt, "require_tensorrt", lambda: trt)
    code = gpu_check.main(["--device", "cpu", "--layers", "2", "--steps", "12"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    table = {line.split(" | ")[0].strip(): [c.strip() for c in line.split(" | ")] for line in lines[2:-1]}
    assert list(table) == ["torch, no cache", "torch eager + AdaCache", "compile(backend='tensorrt')",
                           "ONNX -> TensorRT engine"]
    assert table["compile(backend='tensorrt')"][2] == "yes" and table["ONNX -> TensorRT engine"][2] == "yes"
    assert table["compile(backend='tensorrt')"][7].startswith("yes")
    assert len(trt.built) == 1 and trt.built[0]["cleared"] == ["TF32"]  # TF32 off for the comparison
    assert float(table["ONNX -> TensorRT engine"][1]) < 1e-3
    # The engine path's skip check is timed (cached step < half a full one): noise on a shared CPU.
    timed_ok = table["ONNX -> TensorRT engine"][7].startswith("yes")
    assert (code, lines[-1]) == ((0, "all checks passed") if timed_ok else (1, "SOME CHECKS FAILED")), out
