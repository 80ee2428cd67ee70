"""pytest fixtures that put the stand-ins in ``sys.modules`` (imported by tests/conftest.py)."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

from . import torch_tensorrt as fake_torch_tensorrt_module


@contextlib.contextmanager
def cuda_available():
    """``torch.cuda.is_available()`` is True inside the block (only the availability checks see it)."""
    saved = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_available = saved


@pytest.fixture
def fake_torch_tensorrt(monkeypatch):
    """The stand-in ``torch_tensorrt`` in ``sys.modules``; ``.compiled`` records each compile call."""
    module = fake_torch_tensorrt_module.make_module()
    monkeypatch.setitem(sys.modules, "torch_tensorrt", module)
    return module


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """``install(version)``: the stand-in ``tensorrt`` of that version in ``sys.modules``, with the
    stand-in current device behind ``torch.cuda.device`` and a null ``torch.cuda.current_stream``."""
    from . import tensorrt as standin

    def install(version: str = "11.0.0"):
        module = standin.make_module(version)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        monkeypatch.setattr(torch.cuda, "device", standin.Device)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
        monkeypatch.setattr(standin.Device, "current", torch.device("cuda", 0))
        return module

    return install
