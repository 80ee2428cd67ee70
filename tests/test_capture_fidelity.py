"""Capture never changes what the model computes: every trace attempt starts from the model as the user
handed it over and leaves it so, and what the forward writes into its buffers (lazily filled caches) is
computed on every call, outside the blocks a cached step skips."""

import copy
import functools
import warnings

import pytest
import torch
import torch._dynamo.testing
from helpers import hand_reference, max_diff, run_steps
from reference_adacache import schedule
from test_policy import record_trajectory
from torch import nn

import adacache_fx as ax
from adacache_fx import presets
from adacache_fx.capture import capture
from adacache_fx.passes.hoist_buffer_writes import buffer_writes, hoist_buffer_writes
from adacache_fx.snapshot import ModelSnapshot
from adacache_fx.tools.fixtures import build, tiny_dit

GRANULARITIES = ["stack", "block", "branch"]


def fresh_stdit():
    """The STDiT3-style fixture, never called: its rotary cache is empty."""
    model, make_inputs = build("stdit")
    assert model.rope.cached_seq_len == 0 and not model.rope.cached_freqs.any()
    return model, make_inputs


def test_capture_leaves_a_fresh_model_as_it_found_it():
    other, other_inputs = fresh_stdit()
    run_steps(other, other_inputs, 1)  # the class-level lru_cache already holds entries (as after other tests)
    model, make_inputs = fresh_stdit()
    snapshot = ModelSnapshot.take(model)
    captured = capture(model, (), make_inputs(0))  # host reads of height/width/fps: several attempts
    assert captured.static_inputs == ("height", "width", "fps")
    assert snapshot.changes() == []
    assert model.rope.cached_seq_len == 0 and not model.rope.cached_freqs.any()
    assert all(block.calls == 0 for block in model.blocks)
    assert type(model).pos_embed.cache_info().currsize == 0  # entries the traces computed are cleared


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fresh_and_warm_models_equal_the_untransformed_model(granularity):
    """The official STDiT3 came out 1% off when transformed before its first call."""
    for warm in (False, True):
        model, make_inputs = fresh_stdit()
        reference = copy.deepcopy(model)
        if warm:
            run_steps(model, make_inputs, 1)
        cached = ax.transform(model, ax.AdaCacheConfig(num_steps=6, codebook=presets.NEVER, granularity=granularity))
        assert max_diff(run_steps(cached, make_inputs, 6), run_steps(reference, make_inputs, 6)) == 0.0


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_a_fresh_model_follows_the_reference_schedule(granularity):
    model, make_inputs = fresh_stdit()
    reference = copy.deepcopy(model)
    codebook = {t * 4.0: r for t, r in presets.FAST_30.items()}  # random weights: residuals change faster
    trajectory, _ = record_trajectory(copy.deepcopy(model), make_inputs, 30, granularity=granularity)
    expected = schedule(trajectory, 30, codebook)
    assert 3 < len(expected) < 30
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=30, codebook=codebook, granularity=granularity))
    outputs = run_steps(cached, make_inputs, 30)
    assert ax.report(cached).computed_steps == expected
    assert max_diff(outputs, hand_reference(reference, make_inputs, 30, set(expected), granularity)) < 1e-5


def test_the_written_buffer_is_computed_before_the_blocks():
    model, make_inputs = fresh_stdit()
    captured = capture(model, (), make_inputs(0))
    gm = captured.graph_module
    (write,) = buffer_writes(gm.graph)  # functionalized: one write, at the end of the graph
    assert write.args[0].target == "rope.cached_freqs"
    assert hoist_buffer_writes(gm) == ["rope.cached_freqs"]
    first_block = next(n for n in gm.graph.nodes if n.meta.get("nn_module_stack") and any(
        path.startswith("blocks.") for path, _ in n.meta["nn_module_stack"].values()))
    order = list(gm.graph.nodes)
    assert order.index(write.args[1]) < order.index(first_block) < order.index(write)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        out = captured.unflatten_outputs(gm(*captured.flatten_inputs((), make_inputs(0))))
        assert float((out - reference(**make_inputs(0))).abs().max()) == 0.0
    # the program writes the cache as the eager call does
    assert torch.equal(model.rope.cached_freqs, reference.rope.cached_freqs)


def test_compiled_fullgraph_and_onnx_on_a_fresh_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from helpers import assert_compiled_and_exported

    model, make_inputs = fresh_stdit()
    steps = [1, 2, 4, 7, 8]
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=8, compute_steps=steps))
    eager = run_steps(cached, make_inputs, 8)
    assert ax.report(cached).computed_steps == steps
    assert_compiled_and_exported(cached, make_inputs, 8, eager, steps, tmp_path / "stdit.onnx")


# -- a DiT with rotary_embedding_torch's lazily filled cache ------------------------------------------
class RotaryTemporalBlock(nn.Module):
    def __init__(self, dim, heads, frames, rope):
        super().__init__()
        self.heads, self.frames, self.rope = heads, frames, [rope]  # the model's rope, not a child
        self.qkv, self.out, self.mlp = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, t):
        b, n, c = x.shape
        f, rope = self.frames, self.rope[0]
        h = (x + t).reshape(b, f, n // f, c).transpose(1, 2).reshape(-1, f, c)
        q, k, v = self.qkv(h).reshape(h.shape[0], f, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rope.rotate_queries_or_keys(q), rope.rotate_queries_or_keys(k)
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, f, c)
        x = x + self.out(h.reshape(b, n // f, f, c).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(torch.nn.functional.gelu(x))


class RotaryTemporalDiT(nn.Module):
    """Temporal attention with ``rotary_embedding_torch.RotaryEmbedding`` (its frequencies cached in a
    buffer on the first forward, as Open-Sora's and Latte's derivatives use it)."""

    def __init__(self, dim=32, heads=2, frames=4, layers=4):
        super().__init__()
        from rotary_embedding_torch import RotaryEmbedding

        self.rope = RotaryEmbedding(dim=dim // heads)
        self.embed, self.t_embed, self.head = nn.Linear(8, dim), nn.Linear(1, dim), nn.Linear(dim, 8)
        self.blocks = nn.ModuleList(RotaryTemporalBlock(dim, heads, frames, self.rope) for _ in range(layers))

    def forward(self, x, timestep):
        t = self.t_embed(timestep.float()[:, None, None] / 1000)
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, t)
        return self.head(x)


def test_rotary_embedding_torch_cache_is_captured_exactly():
    pytest.importorskip("rotary_embedding_torch")
    torch.manual_seed(0)
    model = RotaryTemporalDiT().eval()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    latents, direction = torch.randn(1, 64, 8, generator=g), torch.randn(1, 64, 8, generator=g)

    def make_inputs(step=0):
        return {"x": latents + 0.02 * step * direction, "timestep": torch.tensor([999 - 50 * step])}

    assert model.rope.cached_freqs_seq_len == 0
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=6, codebook=presets.NEVER))
    assert max_diff(run_steps(cached, make_inputs, 6), run_steps(reference, make_inputs, 6)) == 0.0
    cached = ax.transform(copy.deepcopy(reference), ax.AdaCacheConfig(num_steps=10, codebook={4.0: 3}))
    run_steps(cached, make_inputs, 10)
    assert ax.report(cached).num_computed < 10


# -- what cannot be captured exactly is refused, naming it -------------------------------------------
class KeepsItsLastInput(nn.Module):
    """A block that stores what it computed from its stream in a buffer (a KV cache, a visualisation)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("last", torch.zeros(2, 4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        h = self.proj(x)
        self.last.copy_(h)
        return x + h


class WritesFromItsStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(KeepsItsLastInput() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_a_block_that_writes_a_buffer_from_its_stream_is_refused():
    cached = ax.transform(WritesFromItsStream(), ax.AdaCacheConfig(num_steps=4))
    with pytest.raises(ax.TransformError, match=r"block blocks\.0 writes the buffers \['blocks\.0\.last'\] from "
                                                r"values it computes from the call's inputs"), torch.no_grad():
        cached(torch.randn(2, 4))


# -- the snapshot itself ------------------------------------------------------------------------------
class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("buf", torch.zeros(3))
        self.weight = nn.Parameter(torch.ones(3))
        self.seen = {}
        self.count = 0

    @functools.lru_cache(maxsize=4)  # noqa: B019 - what models do
    def table(self, n):
        return torch.arange(n)


def test_snapshot_restores_attributes_containers_buffers_and_caches():
    model = Stateful()
    type(model).table.cache_clear()
    snapshot = ModelSnapshot.take(model)
    model.count = 3
    model.extra = "new"
    model.seen["x"] = 1
    model.buf.add_(1.0)
    model.table(4)
    assert sorted(snapshot.changes()) == ["Stateful.count set", "Stateful.extra added", "buffer buf written",
                                          "contents of a dict changed",
                                          f"lru_cache {Stateful.__module__}.Stateful.table filled"]
    buffer = model.buf
    assert snapshot.restore() == []
    assert model.count == 0 and not hasattr(model, "extra") and model.seen == {}
    assert model.buf is buffer and not model.buf.any()
    assert type(model).table.cache_info().currsize == 0
    assert snapshot.changes() == []
    with torch.no_grad():
        model.weight.mul_(2)  # parameters are not copied: reported, not restored
    assert snapshot.restore() == ["parameter weight written"]


def test_an_eager_only_fast_path_is_named_once_and_exact_without_it():
    """nn.MultiheadAttention under no_grad runs a native kernel no trace records: said once, never silent."""
    model, make_inputs = tiny_dit()
    reference = copy.deepcopy(model)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, codebook=presets.NEVER))
    with pytest.warns(UserWarning, match=r"eager-only fast path \(blocks.0.attn, blocks.0.cross, blocks.1.attn"):
        first = run_steps(cached, make_inputs, 2)
    assert 0 < max_diff(first, run_steps(reference, make_inputs, 2)) < 1e-5
    assert "fast path" in ax.check(reference, **make_inputs(0)).notes[0]
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cached = ax.transform(copy.deepcopy(reference), ax.AdaCacheConfig(num_steps=4, codebook=presets.NEVER))
            assert max_diff(run_steps(cached, make_inputs, 4), run_steps(reference, make_inputs, 4)) == 0.0
        assert ax.check(reference, **make_inputs(0)).notes == []
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.parametrize("granularity", ["stack", "block"])
def test_a_region_output_keeps_the_layout_the_model_computed_it_in(granularity):
    """AceStep's last layer returns a transposed-layout stream; a branch output is contiguous, and the
    RMSNorm after the stack summed in another order (4.8e-7 off) until the layout was restored."""
    pytest.importorskip("diffusers")
    from adacache_fx.tools.corpus import CONFIGS
    from adacache_fx.tools.corpus.runner import build as build_config
    from adacache_fx.tools.corpus.runner import call

    config = next(c for c in CONFIGS if c.name == "AceStepTransformer1DModel")
    model = build_config(config)
    reference = copy.deepcopy(model)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, codebook=presets.NEVER, granularity=granularity))
    with torch.no_grad():
        for sigma in (1.0, 0.7, 0.4):
            got, expected = call(cached, config, sigma), call(reference, config, sigma)
            assert torch.equal(got[0], expected[0])
    program = cached.program()
    assert any(n.target is torch.ops.aten.empty_strided.default for n in program.graph_module.graph.nodes)
