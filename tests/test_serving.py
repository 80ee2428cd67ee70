"""A state per request: generations interleaved step by step (a server's loop), each in its own cache
context with its own N, equal their solo runs; a released context frees its tensors; one program (and
one ONNX file) serves every N."""

import copy
import gc

import pytest
import torch
import torch._dynamo.testing
from helpers import first_tensor, run_steps
from torch.multiprocessing.reductions import StorageWeakRef

import adacache_fx as ax
from adacache_fx.tools.fixtures import build

STEPS = {"a": 20, "b": 30, "c": 50}
# a codebook that skips on the tiny Wan (its metric c sits around 0.02 - 0.2 per step)
CODEBOOK = {0.05: 4, 0.1: 3, 0.2: 2, 1.0: 1}


@pytest.fixture(scope="module")
def wan():
    return build("wan", num_layers=2)


def solo(model, make_inputs, num_steps):
    cached = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(num_steps=num_steps, codebook=CODEBOOK))
    return run_steps(cached, make_inputs, num_steps), ax.report(cached).computed_steps


@torch.no_grad()
def interleaved(cached, make_inputs, steps=STEPS):
    """One step of every unfinished request in turn, as a server's loop runs them."""
    outputs = {name: [] for name in steps}
    for s in range(max(steps.values())):
        for name, n in steps.items():
            if s < n:
                with cached.cache_context(name, num_steps=n):
                    outputs[name].append(first_tensor(cached(**make_inputs(s))).clone())
    return outputs


def test_interleaved_requests_equal_their_solo_runs(wan):
    model, make_inputs = wan
    cached = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(codebook=CODEBOOK))  # no N: each request's own
    outputs = interleaved(cached, make_inputs)
    assert len(cached.programs) == 1  # one capture serves every N
    for name, n in STEPS.items():
        expected, computed = solo(model, make_inputs, n)
        report = ax.report(cached, name)
        assert report.num_steps == n and report.computed_steps == computed
        assert 3 < len(computed) < n  # each request skips, on its own schedule
        assert all(torch.equal(a, b) for a, b in zip(outputs[name], expected))


def test_a_released_request_frees_its_tensors_and_starts_afresh(wan):
    model, make_inputs = wan
    cached = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(codebook=CODEBOOK))
    interleaved(cached, make_inputs, {"a": 8, "b": 6})  # "a" runs last: the bound sets pointed at it
    held = [StorageWeakRef(t.untyped_storage()) for t in cached.state("a").values()]
    ax.release(cached, "a")
    gc.collect()
    assert all(ref.expired() for ref in held)  # nothing (bound sets included) keeps their memory
    assert cached.contexts == ["b"]
    with pytest.raises(KeyError, match="no cache context 'a'"):
        ax.release(cached, "a")
    with pytest.raises(ValueError, match="number of denoising steps"):
        with cached.cache_context("a"), torch.no_grad():  # a released request's N is forgotten too
            cached(**make_inputs(0))
    # the same name again: a new generation from step 1, equal to a fresh solo run
    outputs = interleaved(cached, make_inputs, {"a": 20})
    expected, computed = solo(model, make_inputs, 20)
    assert ax.report(cached, "a").computed_steps == computed
    assert all(torch.equal(a, b) for a, b in zip(outputs["a"], expected))


def test_releasing_the_active_context_inside_it(wan):
    model, make_inputs = wan
    cached = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(codebook=CODEBOOK))
    with cached.cache_context("a", num_steps=6), torch.no_grad():
        cached(**make_inputs(0))
        held = [StorageWeakRef(t.untyped_storage()) for t in cached.state().values()]
        cached.release("a")
        gc.collect()
        assert all(ref.expired() for ref in held)


def test_a_context_allocates_only_the_signatures_it_runs(wan):
    model, make_inputs = wan
    cached = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(num_steps=6, codebook=CODEBOOK))
    small = make_inputs(0)
    large = dict(small, hidden_states=torch.randn(1, 4, 2, 16, 32))
    with torch.no_grad():
        with cached.cache_context("small"):
            cached(**small)
        with cached.cache_context("large"):
            cached(**large)
        with cached.cache_context("small"):  # entering it again allocates nothing for the other signature
            cached(**make_inputs(1))
    assert len(cached.programs) == 2
    assert [len(cached._store._storage.get(c, {})) for c in ("small", "large")] == [1, 1]
    assert "default" not in cached._store._storage or not cached._store._storage["default"]


def test_compiled_serves_every_n_without_a_new_capture(wan):
    model, make_inputs = wan
    cached = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(codebook=CODEBOOK))
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(cached, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    steps = {"a": 6, "b": 9, "c": 12}
    outputs = {name: [] for name in steps}
    with torch.no_grad():
        for s in range(12):
            for name, n in steps.items():
                if s < n:
                    with cached.cache_context(name, num_steps=n):
                        outputs[name].append(first_tensor(compiled(**make_inputs(s))).clone())
    assert len(cached.programs) == 1
    assert counter.frame_count == 1  # the history's rows (N) are a dynamic dimension of the one graph
    for name, n in steps.items():
        expected, computed = solo(model, make_inputs, n)
        assert ax.report(cached, name).computed_steps == computed
        assert max(float((a - b).abs().max()) for a, b in zip(outputs[name], expected)) < 1e-5


def test_onnx_runner_serves_interleaved_requests(wan, tmp_path):
    pytest.importorskip("onnxruntime")
    from adacache_fx.export import OnnxRunner, to_onnx

    model, make_inputs = wan
    cached = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(num_steps=6, codebook=CODEBOOK))
    to_onnx(cached, (), tmp_path / "wan.onnx", kwargs=make_inputs(0))
    runner = OnnxRunner(tmp_path / "wan.onnx")
    steps = {"a": 6, "b": 9}
    outputs = interleaved(runner, make_inputs, steps)
    for name, n in steps.items():
        expected, computed = solo(model, make_inputs, n)
        assert runner.report(name).computed_steps == computed
        assert max(float((a - b).abs().max()) for a, b in zip(outputs[name], expected)) < 1e-5
    held = [StorageWeakRef(t.untyped_storage()) for t in runner.state("a").values()]
    runner.release("a")
    gc.collect()
    assert runner.contexts == ["b"] and all(ref.expired() for ref in held)


def test_the_serving_example_prints_its_tables(capsys):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "serve.py"
    spec = importlib.util.spec_from_file_location("serve_example", path)
    serve = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = serve  # (its dataclasses look their module up)
    spec.loader.exec_module(serve)
    threads = torch.get_num_threads()
    try:
        assert serve.main(["--requests", "4", "--batch", "2", "--steps", "6", "8", "--sizes", "4x16", "2x8",
                           "--repeats", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "captures {'shared': 1, 'per_sample': 1}" in out  # one capture for two sizes and two Ns
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"uncached", "shared", "per_sample"} <= set(rows)
    assert rows["uncached"].split("|")[4].strip() == "1.00x"
    requests = [line.split("|") for line in out.splitlines() if line.startswith(("| 0 |", "| 1 |", "| 2 |", "| 3 |"))]
    assert [(r[3].strip(), r[4].strip()) for r in requests] == [("4x16x16", "6"), ("4x16x16", "8"), ("2x8x8", "6"),
                                                                 ("2x8x8", "8")]
    for request in requests:  # each request's computed steps: its N's first two and last two steps at least
        n = int(request[4])
        for computed in request[5:7]:
            steps = [int(v) for v in computed.split(":")[1].strip(" []").split(",")]
            assert steps[:2] == [1, 2] and steps[-2:] == [n - 1, n]
