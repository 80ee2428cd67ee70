"""``transform(model, config, dynamic_shapes=...)``: one capture serves several frame counts and resolutions,
with a state per size, and equals the static-shape transform; a dimension the forward specializes is named
in a warning and gets a capture per value."""

import copy
import warnings
from dataclasses import replace

import pytest
import torch
from helpers import first_tensor
from torch.export import Dim

import adacache_fx as ax
from adacache_fx.passes.graph_utils import cond_nodes
from adacache_fx.tools.fixtures import build, tiny_dit

STEPS = 12
CODEBOOK = {0.05: 4, 0.1: 3, 0.2: 2, 1.0: 1}  # skips on the tiny Wan
SIZES = [(2, 8), (3, 12), (2, 12), (3, 8)]  # (frames, height = width)
WAN_DIMS = {"hidden_states": {2: Dim("frames", max=16), 3: 2 * Dim("h", max=32), 4: 2 * Dim("w", max=32)}}


@pytest.fixture(scope="module")
def wan():
    return build("wan", num_layers=2)


def sized_inputs(make_inputs, frames, size):
    def make(step):
        kwargs = make_inputs(step)
        latents = torch.randn(1, 4, frames, size, size, generator=torch.Generator().manual_seed(frames * 100 + size))
        return {**kwargs, "hidden_states": latents + 0.02 * step}
    return make


@torch.no_grad()
def run(cached, make, context):
    with cached.cache_context(context, num_steps=STEPS):
        return [first_tensor(cached(**make(s))).clone() for s in range(STEPS)]


def config():
    return ax.AdaCacheConfig(num_steps=STEPS, codebook=CODEBOOK)


@pytest.mark.parametrize("spec", [WAN_DIMS, "auto"], ids=["dims", "auto"])
def test_one_capture_serves_two_resolutions_and_frame_counts(wan, spec):
    model, make_inputs = wan
    dynamic = ax.transform(copy.deepcopy(model), config(), dynamic_shapes=spec)
    skipped = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for frames, size in SIZES:
            make = sized_inputs(make_inputs, frames, size)
            static = ax.transform(copy.deepcopy(model), config())
            name = f"{frames}x{size}"
            a, b = run(dynamic, make, name), run(static, make, "default")
            assert max(float((x - y).abs().max()) for x, y in zip(a, b)) == 0.0
            assert ax.report(dynamic, name).computed_steps == ax.report(static, "default").computed_steps
            skipped += STEPS - ax.report(dynamic, name).num_computed
            tokens = frames * (size // 2) ** 2
            assert dynamic.state(name)["cache_0_0"].shape == (1, tokens, 32)  # the state follows the size
    assert dynamic._captures == 1 and len(dynamic._programs) == 1
    assert skipped > 0
    notes = [str(w.message) for w in caught if "adacache_fx" in str(w.message)]
    if spec == "auto":  # batch 1: torch.export specializes a sample size of 0 or 1
        assert len(notes) == 1 and "hidden_states dim 0" in notes[0] and "hidden_states dim 0 is 1" in notes[0]
    else:
        assert notes == []


def test_symbolic_sizes_read_inside_the_stack_are_recomputed_in_its_branch():
    """HunyuanVideo's single-stream blocks split the joint sequence at the video token count, a symbolic
    size computed outside the stack from ``hidden_states``: the compute branch recomputes it from that
    tensor (a ``torch.cond`` operand is a tensor), and the dynamic capture equals the static transform."""
    model, make_inputs = build("hunyuan_video", num_layers=2)
    wide = ax.AdaCacheConfig(num_steps=STEPS, codebook={1.0: 3, 1e9: 1})  # reuses on the untrained model
    dims = {"hidden_states": {2: Dim("frames", max=16), 3: 2 * Dim("h", max=32), 4: 2 * Dim("w", max=32)}}
    dynamic = ax.transform(copy.deepcopy(model), wide, dynamic_shapes=dims)
    skipped = 0
    for frames, size in SIZES[:2]:
        make = sized_inputs(make_inputs, frames, size)
        static = ax.transform(copy.deepcopy(model), wide)
        name = f"{frames}x{size}"
        a, b = run(dynamic, make, name), run(static, make, "default")
        assert max(float((x - y).abs().max()) for x, y in zip(a, b)) == 0.0
        assert ax.report(dynamic, name).computed_steps == ax.report(static, "default").computed_steps
        skipped += STEPS - ax.report(dynamic, name).num_computed
    assert dynamic._captures == 1 and len(dynamic._programs) == 1
    (program,) = dynamic._programs.values()
    assert len(cond_nodes(program.graph_module.graph)) == 1  # the whole stack, dual- and single-stream blocks
    assert skipped > 0


class ShapeBranch(torch.nn.Module):
    """A tiny DiT whose forward branches on the frame count."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_dit()[0]

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        if hidden_states.shape[2] > 2:
            hidden_states = hidden_states * 0.5
        return self.inner(hidden_states, timestep, encoder_hidden_states)


def test_a_specialized_dimension_is_named_and_captured_per_signature():
    _, make_inputs = tiny_dit()
    model = ShapeBranch().eval()
    dims = {"hidden_states": {2: Dim("frames", min=1, max=8)}}
    dynamic = ax.transform(copy.deepcopy(model), config(), dynamic_shapes=dims)
    static = ax.transform(copy.deepcopy(model), config())
    with pytest.warns(UserWarning, match=r"cannot take the sizes hidden_states dim 2 symbolically.*frames.*specialized it to be a constant \(2\)") as caught:
        outputs = [run(cached, sized_inputs(make_inputs, 2, 8), "default") for cached in (dynamic, static)]
    notes = [str(w.message) for w in caught if "symbolically" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in caught]
    assert max(float((x - y).abs().max()) for x, y in zip(*outputs)) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        run(dynamic, sized_inputs(make_inputs, 3, 8), "other")
    assert dynamic._captures == 2 and len(dynamic._programs) == 2


@pytest.mark.parametrize("backend", ["counter", "inductor"])
def test_compiled_once_serves_every_size(wan, backend):
    """torch.compile(fullgraph=True) of a dynamic-shape transform: one graph for two frame counts and two
    resolutions (no recompile, no break), each size with the eager run's computed steps and outputs."""
    import torch._dynamo.testing
    from helpers import counted_compile

    model, make_inputs = wan
    dynamic = ax.transform(copy.deepcopy(model), config(), dynamic_shapes=WAN_DIMS)
    if backend == "counter":
        compiled, counter = counted_compile(dynamic)
    else:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled, counter = torch.compile(dynamic, fullgraph=True), None
    for frames, size in SIZES:
        make, name = sized_inputs(make_inputs, frames, size), f"{frames}x{size}"
        got, expected = run(compiled, make, name), run(dynamic, make, name + "-eager")
        assert max(float((x - y).abs().max()) for x, y in zip(got, expected)) < 1e-5
        assert ax.report(dynamic, name).computed_steps == ax.report(dynamic, name + "-eager").computed_steps
        assert ax.report(dynamic, name).num_computed < STEPS
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    if counter is not None:
        assert counter.frame_count == 1
    else:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert dynamic._captures == 1


def test_flat_cond_outputs_rewrites_only_a_dynamic_graph(wan):
    """The pass on captured graphs: a static capture keeps its cond outputs; a dynamic one returns them 1-D
    from its branches and views them back (same values: the dynamic transform equals the static one above)."""
    from adacache_fx.passes.flat_cond_outputs import symbolic
    from adacache_fx.passes.graph_utils import cond_nodes

    model, make_inputs = wan
    make = sized_inputs(make_inputs, 2, 8)
    counts = {}
    for name, spec in (("static", None), ("dynamic", WAN_DIMS)):
        cached = ax.transform(copy.deepcopy(model), config(), dynamic_shapes=spec)
        run(cached, make, "default")
        gm = cached.program().graph_module
        outputs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.view_as.default]
        counts[name] = len(outputs)
        assert symbolic(gm.graph) == (spec is not None)
        branch = getattr(gm, cond_nodes(gm.graph)[0].args[1].target)
        flat = [o for o in branch.graph.output_node().args[0] if o.target is torch.ops.aten.reshape.default]
        assert len(flat) == counts[name]
    assert counts["static"] == 0 and counts["dynamic"] > 0


def test_dims_named_by_parameter_follow_a_positional_call(wan):
    """``dynamic_shapes`` names the forward's parameters; a latent passed positionally keeps them too."""
    model, make_inputs = wan
    dynamic = ax.transform(copy.deepcopy(model), config(), dynamic_shapes=WAN_DIMS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing specialized
        for frames, size in SIZES[:2]:
            kwargs = sized_inputs(make_inputs, frames, size)(0)
            with torch.no_grad(), dynamic.cache_context(f"{frames}x{size}", num_steps=STEPS):
                dynamic(kwargs.pop("hidden_states"), **kwargs)
    assert dynamic._captures == 1 and dynamic._dynamic.dims == {"arg0": (2, 3, 4)}


def batched(make_inputs, batch):
    """``batch`` videos at 2 frames x 8x8, each row's latents scaled apart."""
    sized = sized_inputs(make_inputs, 2, 8)

    def make(step):
        kwargs = sized(step)
        rows = {k: torch.cat([v] * batch) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        rows["hidden_states"] = torch.cat([kwargs["hidden_states"] * (1 + 0.1 * i) for i in range(batch)])
        return rows
    return make


BATCH_DIMS = {name: {0: Dim("batch", min=2, max=8)} for name in ("hidden_states", "timestep", "encoder_hidden_states")}


def test_a_dynamic_batch_with_shared_decisions_and_refused_per_sample(wan):
    """Shared decisions: one capture serves batches of 2 and 3, each equal to its static transform. Per-sample
    decisions keep a state row per video, so a symbolic batch is refused by name; "auto" leaves it static."""
    model, make_inputs = wan
    dynamic = ax.transform(copy.deepcopy(model), config(), dynamic_shapes=BATCH_DIMS)
    for batch in (2, 3):
        make = batched(make_inputs, batch)
        static = ax.transform(copy.deepcopy(model), config())
        a, b = run(dynamic, make, f"b{batch}"), run(static, make, "default")
        assert max(float((x - y).abs().max()) for x, y in zip(a, b)) == 0.0
        assert ax.report(dynamic, f"b{batch}").computed_steps == ax.report(static, "default").computed_steps
    assert dynamic._captures == 1
    rows = ax.transform(copy.deepcopy(model), replace(config(), batch_decisions="per_sample"),
                        dynamic_shapes=BATCH_DIMS)
    with pytest.raises(ax.TransformError, match=r"per_sample' needs a static batch size.*leave the batch"):
        run(rows, batched(make_inputs, 2), "rows")
    auto = ax.transform(copy.deepcopy(model), replace(config(), batch_decisions="per_sample"), dynamic_shapes="auto")
    run(auto, batched(make_inputs, 2), "rows")
    assert auto._dynamic.dims == {"hidden_states": (2, 3, 4)}
