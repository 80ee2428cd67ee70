"""Shared test helpers: run a denoising-like loop and compare outputs."""

from __future__ import annotations

import torch


def first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    return first_tensor(output.sample)


@torch.no_grad()
def run_steps(model, make_inputs, num_steps):
    return [first_tensor(model(**make_inputs(s))).clone() for s in range(num_steps)]


def max_diff(a_list, b_list):
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(a_list, b_list))


def block_list(model):
    return model.blocks if hasattr(model, "blocks") else model.transformer_blocks


def tensors(value):
    return list(value) if isinstance(value, (tuple, list)) else [value]


def stream_inputs(args, kwargs, outputs):
    """The block inputs the outputs update: the tensor argument of the same shape, for each output."""
    candidates = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    return [next(a for a in candidates if a.shape == o.shape) for o in outputs]


@torch.no_grad()
def hand_reference(model, make_inputs, num_steps, compute_steps, granularity, extrapolate=False, gain=1.0):
    """Run the original model; on cached steps replace block outputs with input + cached residual
    (``extrapolate``: the residual extrapolated linearly from the last two computed ones, its change times
    ``gain``; ``gain="fit"``: refitted on every compute step, sums in float32, as ``CacheConfig.forecast_gain``)."""
    blocks = list(block_list(model))
    residual, previous = {}, {}  # block index (or "stack") -> list of residual tensors
    computed = []  # steps computed so far
    stack_in = {}
    outputs = []
    fit = {"gain": 1.0 if gain == "fit" else gain, "dot": 0.0, "norm": 0.0}

    def weight(s):
        return (s - computed[-1]) / (computed[-1] - computed[-2]) if len(computed) >= 2 else 0.0

    def reuse(key, s):
        if not extrapolate or key not in previous:
            return residual[key]
        w = weight(s) * fit["gain"]
        return [r + w * (r - p) for r, p in zip(residual[key], previous[key])]

    def store(key, value, s):
        if gain == "fit" and key in previous:  # the forecast of this step from the earlier compute steps
            for new, r, p in zip(value, residual[key], previous[key]):
                step = (r.float() + weight(s) * (r.float() - p.float())) - r.float()
                fit["dot"] += ((new.float() - r.float()) * step).sum()
                fit["norm"] += (step * step).sum()
        if key in residual:
            previous[key] = residual[key]
        residual[key] = value

    def hook(i, s, compute):
        def fn(module, args, kwargs, output):
            outs = tensors(output)
            ins = stream_inputs(args, kwargs, outs)
            if granularity in ("block", "branch"):  # per-branch residuals sum to the block residual
                if compute:
                    store(i, [o - x for o, x in zip(outs, ins)], s)
                    return output
                new = [x + r for x, r in zip(ins, reuse(i, s))]
            else:
                if i == 0:
                    stack_in["x"] = ins
                if compute:
                    if i == len(blocks) - 1:
                        store("stack", [o - x for o, x in zip(outs, stack_in["x"])], s)
                    return output
                last = i == len(blocks) - 1
                new = [x + r for x, r in zip(stack_in["x"], reuse("stack", s))] if last else ins
            return tuple(new) if isinstance(output, tuple) else new[0]

        return fn

    for s in range(1, num_steps + 1):
        compute = s in compute_steps
        handles = [b.register_forward_hook(hook(i, s, compute), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            outputs.append(first_tensor(model(**make_inputs(s - 1))).clone())
        finally:
            for h in handles:
                h.remove()
        if compute:
            computed.append(s)
            if fit["norm"] > 0:
                fit["gain"] = float((fit["dot"] / fit["norm"]).clamp(0.0, 1.0))
            fit["dot"] = fit["norm"] = 0.0
    return outputs


def assert_compiled_and_exported(cached, make_inputs, num_steps, eager, expected, onnx_path, if_nodes=None):
    """``cached`` (``eager``: its outputs, ``expected``: its computed steps) compiled with ``fullgraph=True``
    gives one frame, no graph break, the same steps and outputs; exported to ONNX (``if_nodes`` ``If``
    nodes, or at least one) and run by ``OnnxRunner``, the same steps and outputs within 1e-4."""
    import torch._dynamo.testing

    import adacache_fx as ax

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(cached, backend=counter, fullgraph=True)
    ax.reset(cached)
    outputs = run_steps(compiled, make_inputs, num_steps)
    assert ax.report(cached).computed_steps == expected
    assert counter.frame_count == 1 and dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert max_diff(outputs, eager) < 1e-5

    import pytest

    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from adacache_fx.export import OnnxRunner, to_onnx

    ax.reset(cached)
    to_onnx(cached, make_inputs(0), onnx_path)
    found = sum(n.op_type == "If" for n in onnx.load(str(onnx_path)).graph.node)
    assert found == if_nodes if if_nodes is not None else found > 0
    runner = OnnxRunner(onnx_path)
    exported = [first_tensor(runner(**make_inputs(s))) for s in range(num_steps)]
    assert runner.report().computed_steps == expected
    assert max_diff(exported, eager) < 1e-4


def counted_compile(model):
    """``(torch.compile(model, fullgraph=True), counter)`` after resetting Dynamo and its counters; the
    counter's ``frame_count`` is the number of graphs, ``torch._dynamo.utils.counters["graph_break"]`` the breaks."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(model, backend=counter, fullgraph=True), counter
