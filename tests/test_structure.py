"""The structure every feature builds on: serializable configs, the state store, the pass pipeline,
the public interface of CachedModel, and the behaviour fixes found on the way."""

import json
import logging
import math

import pytest
import torch
from reference_adacache import schedule

import adacache_fx as ax
from adacache_fx import presets
from adacache_fx.config import config_from_dict
from adacache_fx.passes import PIPELINE, PassError, stage_name
from adacache_fx.policies.adacache import StepEnd
from adacache_fx.state import StateLayout, StateSpec, StateStore
from adacache_fx.tools.fixtures import tiny_dit


def run(model, make_inputs, steps):
    with torch.no_grad():
        return [model(**make_inputs(s)) for s in range(steps)]


# -- configs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    ax.AdaCacheConfig(),
    ax.AdaCacheConfig(num_steps=30, codebook=presets.NEVER, metric_block=[1, 2], granularity="branch"),
    ax.AdaCacheConfig(moreg=ax.MoRegConfig(strides=[1, 2], window=[3, 27], power=(0.4, 8, 1), frames=4),
                      warmup_steps=3, extrapolation_order=1, metric_branch=1),
    ax.AdaCacheConfig(num_steps=10, compute_steps=[1, 5, 3]),
], ids=["default", "never-branch", "moreg-warm-linear", "forced"])
def test_config_round_trips_through_a_dict_and_json(config):
    data = config.to_dict()
    assert data["type"] == "AdaCacheConfig" and data["version"] == 1
    assert ax.AdaCacheConfig.from_dict(data) == config
    assert ax.AdaCacheConfig.from_dict(json.loads(json.dumps(data))) == config


def test_config_from_dict_refuses_unknown_fields_and_other_types():
    data = ax.AdaCacheConfig().to_dict()
    with pytest.raises(ValueError, match=r"unknown AdaCacheConfig fields \['speed'\]"):
        ax.AdaCacheConfig.from_dict({**data, "speed": 2})
    with pytest.raises(ValueError, match="not a AdaCacheConfig dict of version 1"):
        ax.AdaCacheConfig.from_dict({**data, "version": 99})

    with pytest.raises(ValueError, match="unknown config type 'SpeedConfig'"):
        config_from_dict({**data, "type": "SpeedConfig"})


def test_config_from_dict_finds_the_subclass_named_in_the_dict():
    config = ax.AdaCacheConfig(num_steps=12, warmup_steps=2)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(TypeError, match="with a registered policy\\), got CacheConfig"):
        ax.transform(tiny_dit()[0], ax.CacheConfig())


def test_config_round_trips_through_onnx_metadata(tmp_path):
    pytest.importorskip("onnx")
    from adacache_fx.export import read_metadata, to_onnx
    from adacache_fx.export.onnx import config_from_metadata

    model, make_inputs = tiny_dit()
    config = ax.AdaCacheConfig(num_steps=8, moreg=ax.MoRegConfig(window=(2, 6)), warmup_steps=2)
    cached = ax.transform(model, config)
    to_onnx(cached, make_inputs(0), tmp_path / "tiny.onnx")
    assert config_from_metadata(read_metadata(tmp_path / "tiny.onnx")) == config


def test_to_onnx_accepts_a_tuple_of_positional_inputs(tmp_path):
    pytest.importorskip("onnxruntime")
    from adacache_fx.export import OnnxRunner, to_onnx

    model, make_inputs = tiny_dit()
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=6))
    inputs = make_inputs(0)
    args = (inputs["hidden_states"], inputs["timestep"])
    info = to_onnx(cached, args, tmp_path / "tiny.onnx", kwargs={"encoder_hidden_states": inputs["encoder_hidden_states"]})
    assert info.input_names == ["arg0", "arg1", "encoder_hidden_states"]
    runner = OnnxRunner(info.path)
    expected = model(**inputs)
    got = runner(*args, encoder_hidden_states=inputs["encoder_hidden_states"])
    assert (got - expected).abs().max() < 1e-4


# -- a non-finite metric picks the last rate -----------------------------------------------------------
def test_nan_metric_picks_the_last_codebook_rate():
    end = StepEnd(dict(presets.FAST_30))
    s, compute = torch.tensor(3), torch.tensor(True)
    rate, next_compute, m_prev = torch.tensor(1), torch.tensor(3), torch.tensor(1.0)
    for distance, expected in ((float("nan"), 1), (float("inf"), 1), (0.0, 6), (0.3, 3)):
        new_rate, new_next, _, _, _ = end(s, compute, torch.tensor(distance), torch.tensor(0.0), rate, next_compute,
                                          m_prev, torch.tensor(10))
        assert int(new_rate) == expected, distance
        assert int(new_next) == 3 + expected


def test_nan_activations_compute_every_step_and_the_report_marks_them():
    model, make_inputs = tiny_dit()
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=12))

    def poisoned(step):
        inputs = make_inputs(step)
        if step >= 3:
            inputs["hidden_states"] = torch.full_like(inputs["hidden_states"], float("nan"))
        return inputs

    run(cached, poisoned, 12)
    report = ax.report(cached)
    assert [r.nonfinite for r in report.steps[:4]] == [False] * 4
    nan_steps = [r for r in report.steps[4:] if r.computed]
    assert nan_steps and all(r.nonfinite and r["metric"] is None and r["rate"] == 1 for r in nan_steps)
    # the plain-Python reference falls through its if/elif chain to the last rate in the same way
    trajectory = [torch.full((3,), float(s + 1)) if s < 4 else torch.full((3,), math.nan) for s in range(12)]
    computed = schedule(trajectory, 12, dict(presets.FAST_30))
    first_nan = next(s for s in computed if s >= 5)
    assert computed[computed.index(first_nan):] == list(range(first_nan, 13))
    assert "non-finite" in str(report)


# -- the state store ------------------------------------------------------------------------------
def _layout():
    return StateLayout((StateSpec("step", (), torch.int64, 0), StateSpec("num_steps", (), torch.int64, 0, returned=False),
                        StateSpec("history", None, torch.float32, math.nan, columns=("metric", "motion", "rate")),
                        StateSpec("cache_0_0", (2, 3), torch.float32, 0.0, cache=True)))


def test_layout_round_trips_and_allocates_for_n():
    layout = _layout()
    restored = StateLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert restored.names == layout.names and json.dumps(restored.to_dict()) == json.dumps(layout.to_dict())
    assert [(s.shape, s.dtype, s.returned, s.cache, s.columns) for s in restored] == [
        (s.shape, s.dtype, s.returned, s.cache, s.columns) for s in layout]
    state = layout.allocate(7)
    assert state["history"].shape == (7, 4) and int(state["num_steps"]) == 7 and state["cache_0_0"].shape == (2, 3)
    assert [s.name for s in layout.returned] == ["step", "history", "cache_0_0"]


def test_store_keeps_contexts_apart_and_rebinds_without_copies():
    store = StateStore(5)
    store.add_layout("k", _layout())
    bound = store.bound("k")
    store.use("k")
    bound["cache_0_0"].fill_(1.0)
    store.switch("uncond")
    assert bound["cache_0_0"].numel() == 0  # a context that never ran "k": nothing allocated, nothing kept
    assert store.contexts == ["default"]
    store.use("k")
    assert store.bound("k") is bound  # bound on first use there (as every call prepares it)
    assert float(bound["cache_0_0"].sum()) == 0.0  # uncond's own storage
    bound["step"].fill_(3)
    store.switch("default")  # a context that ran "k": re-pointed at once, no copy
    assert float(bound["cache_0_0"].sum()) == 6.0 and int(bound["step"]) == 0
    assert store.contexts == ["default", "uncond"]
    store.reset(6)  # a new N reallocates every context
    store.bound("k")
    assert bound["history"].shape == (6, 4) and float(bound["cache_0_0"].sum()) == 0.0


def test_store_refuses_a_new_signature_mid_generation():
    store = StateStore(5)
    store.add_layout("a", _layout())
    store.add_layout("b", _layout())
    store.use("a")
    store.get("a")["step"].fill_(2)
    with pytest.raises(ValueError, match=r"step 2 of 5 in cache context 'default'"):
        store.use("b")
    store.get("a")["step"].fill_(5)  # the generation finished
    store.use("b")


# -- the pass pipeline ----------------------------------------------------------------------------------
def test_each_stage_logs_what_it_matched(caplog):
    model, make_inputs = tiny_dit()
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=5))
    with caplog.at_level(logging.DEBUG, logger="adacache_fx.passes"):
        run(cached, make_inputs, 1)
    messages = [r.getMessage() for r in caplog.records if r.name == "adacache_fx.passes"]
    assert [m.split(":")[0] for m in messages] == [stage_name(stage) for stage in PIPELINE]
    by_stage = dict(m.split(": ", 1) for m in messages)
    assert by_stage["find_blocks"] == "4 blocks: blocks.0 .. blocks.3"
    assert by_stage["insert_cache"].startswith("1 torch.cond")


class _NoOps(torch.nn.Module):
    """Casts to the dtype a tensor has, eval dropout, contiguous of a contiguous tensor; and a real cast."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        h = self.dropout(self.linear(x.to(x.dtype)).contiguous()).type_as(x)
        return h.to(torch.float64).sum(-1), h.transpose(0, 1).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_identities_erases_only_the_no_ops_and_keeps_the_values(dtype):
    from adacache_fx.capture import capture
    from adacache_fx.passes.drop_identities import drop_identities

    model = _NoOps().to(dtype).eval()
    x = torch.randn(3, 8, dtype=dtype)
    gm = capture(model, (x,), {}).graph_module
    # export keeps: 2 _assert_tensor_metadata, x.to(x.dtype), dropout, type_as; the float64 cast; the
    # transpose's contiguous (the linear's contiguous is gone already)
    assert drop_identities(gm) == 5
    aten = torch.ops.aten
    after = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert after == [aten.linear.default, aten.to.dtype, aten.sum.dim_IntList, aten.transpose.int, aten.contiguous.default]
    with torch.no_grad():
        for got, want in zip(gm(x), model(x)):
            assert got.dtype == want.dtype and torch.equal(got, want)


def test_drop_identities_shortens_the_compute_branch_of_a_dit():
    from adacache_fx.capture import capture

    model, make_inputs = tiny_dit()
    no_ops = (torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten.dropout.default)
    captured = capture(model, (), make_inputs(0)).graph_module
    assert sum(1 for n in captured.graph.nodes if n.target in no_ops) > 0
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=5, codebook=presets.NEVER))
    got = run(cached, make_inputs, 3)
    want = run(model, make_inputs, 3)
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) < 1e-5
    compute = cached.program().graph_module.adacache_region0_compute
    targets = [n.target for n in compute.graph.nodes if n.op == "call_function"]
    assert len(targets) > 0 and not set(targets) & set(no_ops)


def test_a_failing_stage_is_named():
    model, make_inputs = tiny_dit()
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=5, metric_block=9))
    with pytest.raises(ax.TransformError, match=r"TinyDiT: plan_metric: metric_block 9 is out of range") as info:
        run(cached, make_inputs, 1)
    assert isinstance(info.value.__cause__, PassError) and info.value.__cause__.stage == "plan_metric"


def test_postconditions_hold_on_the_rewritten_graph():
    model, make_inputs = tiny_dit()
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=5, granularity="block", extrapolation_order=1))
    run(cached, make_inputs, 1)
    program = cached.program()
    graph = program.graph_module.graph
    conds = [n for n in graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == len(program.rewrite.regions) == 4
    state_inputs = [n.name for n in graph.nodes if n.op == "placeholder"][-len(program.layout):]
    assert state_inputs == [f"adacache_{name}" for name in program.layout.names]


# -- public interface of CachedModel ----------------------------------------------------------------------
def test_program_hooks_reach_existing_and_new_programs_and_can_be_removed():
    model, make_inputs = tiny_dit()
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=5))
    run(cached, make_inputs, 1)
    seen = []
    handle = cached.register_program_hook(seen.append)
    assert seen == [cached.program()]  # the existing program
    ax.reset(cached)
    other = dict(make_inputs(0), hidden_states=torch.randn(1, 4, 2, 4, 4))
    with torch.no_grad():
        cached(**other)
    assert len(seen) == 2 and seen[1] is cached.program()
    handle.remove()
    ax.reset(cached)
    with torch.no_grad():
        cached(**dict(make_inputs(0), hidden_states=torch.randn(1, 4, 4, 4, 4)))
    assert len(seen) == 2


def test_prepare_hooks_run_before_each_call_and_contexts_are_listed():
    model, make_inputs = tiny_dit()
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=5))
    calls = []
    cached.register_prepare_hook(lambda m, args, kwargs: calls.append((m.active_context, sorted(kwargs))))
    run(cached, make_inputs, 2)
    with cached.cache_context("uncond"):
        run(cached, make_inputs, 1)
    assert calls == [("default", ["encoder_hidden_states", "hidden_states", "timestep"])] * 2 + [
        ("uncond", ["encoder_hidden_states", "hidden_states", "timestep"])]
    assert cached.contexts == ["default", "uncond"]
    assert ax.report(cached, "uncond").num_computed == 1
    with pytest.raises(RuntimeError, match=r"no generation has run in cache context 'cfg'.*\['default', 'uncond'\]"):
        ax.report(cached, "cfg")


# -- a new policy is one class and one registration ---------------------------------------------------
from dataclasses import dataclass  # noqa: E402

from adacache_fx.policies import Policy, register_policy  # noqa: E402
from adacache_fx.state import StateSpec as _Spec  # noqa: E402


@dataclass(frozen=True)
class EveryKConfig(ax.AdaCacheConfig):
    """Compute every k-th step (and steps 1, N-1, N); record the AdaCache distance on compute steps."""

    k: int = 3


@register_policy(EveryKConfig)
class EveryKPolicy(Policy):
    history_columns = ("distance",)

    def state_specs(self):
        return (_Spec("last", (), torch.int64, 0),)

    def decide(self, step, num_steps, state, signal=None):
        fresh = (step == 0) | (step >= num_steps)
        s = torch.where(fresh, torch.ones_like(step), step + 1)
        compute = ((s - 1) % self.config.k == 0) | (s >= num_steps - 1)
        return s, compute, {"last": torch.where(compute, s, state["last"])}

    def update(self, s, compute, parts, state, num_steps):
        metric = parts[0][0] / parts[0][1].clamp_min(1e-12)
        return state, {"distance": torch.where(compute & (s > 1), metric, torch.full_like(metric, float("nan")))}


def test_a_registered_policy_runs_eager_compiled_and_exported(tmp_path):
    model, make_inputs = tiny_dit()
    cached = ax.transform(model, EveryKConfig(num_steps=9, k=3))
    eager = run(cached, make_inputs, 9)
    report = ax.report(cached)
    assert report.computed_steps == [1, 4, 7, 8, 9]
    assert all(r["distance"] is not None for r in report.steps if r.computed and r.step > 1)
    assert report.columns == ("distance",)
    lines = str(report).splitlines()
    assert lines[1].split() == ["step", "computed", "distance"] and lines[3].split() == ["2", "cached"]

    import torch._dynamo.testing

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(cached, backend=counter, fullgraph=True)
    ax.reset(cached)
    outputs = run(compiled, make_inputs, 9)
    assert ax.report(cached).computed_steps == [1, 4, 7, 8, 9]
    assert counter.frame_count == 1 and dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert max(float((a - b).abs().max()) for a, b in zip(outputs, eager)) < 1e-5

    pytest.importorskip("onnxruntime")
    from adacache_fx.export import OnnxRunner, to_onnx

    ax.reset(cached)
    to_onnx(cached, make_inputs(0), tmp_path / "every3.onnx")
    runner = OnnxRunner(tmp_path / "every3.onnx")
    exported = [runner(**make_inputs(s)) for s in range(9)]
    assert runner.report().computed_steps == [1, 4, 7, 8, 9]
    assert runner.report().columns == ("distance",)
    assert max(float((a - b).abs().max()) for a, b in zip(exported, eager)) < 1e-4


def test_docstring_examples_run():
    import doctest
    import importlib

    for name in ("api", "check", "config", "tools.fixtures.tiny", "calibrate", "integrations.diffusers", "policies.easycache",
                 "policies.first_block", "policies.teacache"):  # (the package's `calibrate` is the function)
        module = importlib.import_module(f"adacache_fx.{name}")
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
