"""The export-preparation passes (adacache_fx/export/prepare/) alone on captured graphs: what each matches,
what it rewrites, that the rewritten graph computes the same values in torch and loads and runs in ONNX Runtime."""

import onnxruntime as ort
import pytest
import torch

from adacache_fx.capture import capture
from adacache_fx.export.prepare import PIPELINE, copy_graph_module, graph_modules, prepare, squeeze_dims, where_dtypes
from adacache_fx.tools.fixtures import build

aten = torch.ops.aten


def _nodes(gm, *targets):
    return [n for m in graph_modules(gm) for n in m.graph.nodes if n.op == "call_function" and n.target in targets]


def _captured(family):
    model, make_inputs = build(family, num_layers=2)
    captured = capture(model, (), make_inputs(0))
    return captured, captured.flatten_inputs((), make_inputs(0))


def _ort_outputs(gm, flat):
    """``gm`` exported with torch.onnx (dynamo) and run by ONNX Runtime's CPU provider."""
    program = torch.onnx.export(gm.eval(), tuple(flat), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, flat)})]


class Squeezes(torch.nn.Module):
    def forward(self, x):  # x: (2, 3, 1, 4)
        return x.squeeze(1) * 2, x.squeeze((1, 2)) + 1, x.squeeze(-2) - 1, x.squeeze(0)


class Selects(torch.nn.Module):
    def forward(self, x, m, i):  # x: float32, m: bool, i: int32, all (3, 4)
        half = x.bfloat16().masked_fill(m, 0.1).float()  # 0.1 as bfloat16 holds it
        short = torch.where(m, i.to(torch.int16), torch.tensor(-7, dtype=torch.int16)).int()
        flags = (x > 0).masked_fill(m, False) | torch.where(m, x < -1, True)
        return half, short, flags.int()


def test_pipeline_lists_one_module_per_concern():
    assert PIPELINE == (squeeze_dims, where_dtypes)
    assert all(callable(stage.run) and stage.__doc__ for stage in PIPELINE)


def test_squeeze_dims_drops_only_the_dims_that_are_not_1():
    x = torch.randn(2, 3, 1, 4)
    captured = capture(Squeezes(), (x,), {})
    gm, flat = captured.graph_module, captured.flatten_inputs((x,), {})
    prepared = copy_graph_module(gm)
    assert squeeze_dims.squeeze_dims(prepared) == 3  # squeeze(1) dropped, (1, 2) -> (2,), squeeze(0) dropped
    kept = _nodes(prepared, aten.squeeze.dim, aten.squeeze.dims)
    assert [tuple(n.meta["val"].shape) for n in kept] == [(2, 3, 4), (2, 3, 4)]
    assert sorted(str(n.args[1]) for n in kept) == ["-2", "[2]"]
    assert len(_nodes(gm, aten.squeeze.dim, aten.squeeze.dims)) == 4  # the original graph is untouched
    expected = gm(*flat)
    for got, want in zip(prepared(*flat), expected):
        assert got.shape == want.shape and torch.equal(got, want)
    for got, want in zip(_ort_outputs(prepared, flat), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family,count", [("pixart", 1), ("allegro", 3)])
def test_squeeze_dims_on_captured_families(family, count):
    """PixArt's and Allegro's ``hidden_states.squeeze(1)`` on ``(batch, tokens, dim)``: ONNX refuses them."""
    captured, flat = _captured(family)
    gm = captured.graph_module
    before = _nodes(gm, aten.squeeze.dim)
    assert [n.meta["val"].shape[1] for n in before] == [n.args[0].meta["val"].shape[1] for n in before]
    prepared = copy_graph_module(gm)
    assert squeeze_dims.squeeze_dims(prepared) == count
    assert not _nodes(prepared, aten.squeeze.dim)
    with torch.no_grad():
        for got, want in zip(prepared(*flat), gm(*flat)):
            assert torch.equal(got, want)


def test_where_dtypes_selects_in_a_type_ort_implements_bit_for_bit():
    x, m = torch.randn(3, 4), torch.rand(3, 4) > 0.5
    i = torch.randint(-100, 100, (3, 4), dtype=torch.int32)
    captured = capture(Selects(), (x, m, i), {})
    gm, flat = captured.graph_module, captured.flatten_inputs((x, m, i), {})
    prepared = copy_graph_module(gm)
    assert where_dtypes.where_dtypes(prepared) == 4  # bf16 masked_fill, int16 where, bool masked_fill and where
    selects = _nodes(prepared, *where_dtypes.VALUE_ARGS)
    assert {n.meta["val"].dtype for n in selects} == {torch.float32, torch.int32, torch.uint8}
    assert all(n.meta.get("stack_trace") for n in selects)  # still names the user's line
    expected = gm(*flat)
    assert torch.equal(expected[0], x.bfloat16().masked_fill(m, 0.1).float())
    for got, want in zip(prepared(*flat), expected):
        assert got.dtype == want.dtype and torch.equal(got, want)
    for got, want in zip(_ort_outputs(prepared, flat), expected):
        assert torch.equal(got, want)


def test_where_dtypes_on_hunyuan_video_bool_mask():
    """HunyuanVideo's ``attention_mask.masked_fill(mask_indices, False)`` on a bool mask (ORT: no Where(bool))."""
    captured, flat = _captured("hunyuan_video")
    gm = captured.graph_module
    (before,) = [n for n in _nodes(gm, aten.masked_fill.Scalar) if n.meta["val"].dtype == torch.bool]
    assert "masked_fill(mask_indices, False)" in before.meta["stack_trace"]
    prepared = copy_graph_module(gm)
    assert where_dtypes.where_dtypes(prepared) == 1
    assert all(n.meta["val"].dtype not in where_dtypes.WIDER for n in _nodes(prepared, *where_dtypes.VALUE_ARGS))
    with torch.no_grad():
        for got, want in zip(prepared(*flat), gm(*flat)):
            assert torch.equal(got, want)


def test_prepare_runs_every_stage_on_a_copy():
    captured, flat = _captured("allegro")
    gm = captured.graph_module
    ctx = prepare(gm)
    assert list(ctx.summaries) == ["squeeze_dims", "where_dtypes"]
    assert ctx.summaries["squeeze_dims"].startswith("3 ")
    assert ctx.graph_module is not gm and len(_nodes(gm, aten.squeeze.dim)) == 3
    assert dict(ctx.graph_module.named_parameters()).keys() == dict(gm.named_parameters()).keys()
    assert all(a is b for a, b in zip(ctx.graph_module.parameters(), gm.parameters()))  # shared, not copied
