"""Models that read small input tensors on the host (static inputs), and models that rebuild a buffer
for an input size other than their config's (input-independent tensors evaluated eagerly)."""

import functools
import logging

import pytest
import torch
import torch._dynamo.testing
from helpers import first_tensor, hand_reference, max_diff, run_steps
from reference_adacache import schedule
from test_policy import record_trajectory
from torch import nn

import adacache_fx as ax
from adacache_fx import presets
from adacache_fx.capture import SPECIALIZE_MAX_NUMEL
from adacache_fx.export import OnnxRunner, read_metadata, to_onnx
from adacache_fx.tools.fixtures import build
from adacache_fx.tools.fixtures.stdit import STDiTBlock


class HostReadDiT(nn.Module):
    """A tiny STDiT-style DiT whose forward reads small input tensors on the host, as ``pattern``:

    * ``"resolution"``: the positional embedding is built for ``height[0].item()`` x
      ``width[0].item()`` (scaled by ``sqrt(H * W) / input_sq_size``, as Open-Sora's STDiT3 does);
    * ``"frames"``: the latents come packed as tokens and the frame count is ``int(num_frames)``;
    * ``"branch"``: a Python ``if`` on the scalar input ``fps`` chooses the conditioning.
    """

    input_sq_size = 64

    def __init__(self, pattern: str, num_layers: int = 2, dim: int = 32, channels: int = 4, patch: int = 2):
        super().__init__()
        self.pattern, self.patch, self.channels = pattern, patch, channels
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.t_embed = nn.Sequential(nn.Linear(32, dim), nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embed = nn.Linear(16, dim)
        self.fast_motion = nn.Parameter(torch.randn(6 * dim) * 0.5)
        self.blocks = nn.ModuleList(STDiTBlock(dim, 2, temporal=i % 2 == 1) for i in range(num_layers))
        self.out = nn.Linear(dim, channels * patch * patch)
        inv_freq = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def pos_embed(self, h: int, w: int, scale: float, base_size: int) -> torch.Tensor:
        grid_h = torch.arange(h, dtype=torch.float32) / scale * (base_size / h)
        grid_w = torch.arange(w, dtype=torch.float32) / scale * (base_size / w)
        gh, gw = torch.meshgrid(grid_h, grid_w, indexing="ij")
        out = [torch.outer(g.reshape(-1), self.inv_freq) for g in (gh, gw)]
        return torch.cat([o.sin() for o in out] + [o.cos() for o in out], dim=-1)

    def forward(self, hidden_states, timestep, encoder_hidden_states, height=None, width=None, num_frames=None,
                fps=None):
        p, c = self.patch, self.channels
        if self.pattern == "frames":  # (B, F * h * w, C * p * p) tokens, h = w = 4
            b, f, h, w = hidden_states.shape[0], int(num_frames), 4, 4
            x = self.embed(hidden_states)
        else:
            b, _, f, hh, ww = hidden_states.shape
            h, w = hh // p, ww // p
            x = hidden_states.reshape(b, c, f, h, p, w, p).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, f * h * w, -1)
            x = self.embed(x)
        if self.pattern == "resolution":
            resolution_sq = (height[0].item() * width[0].item()) ** 0.5
            pos = self.pos_embed(h, w, resolution_sq / self.input_sq_size, round((h * w) ** 0.5))
            x = (x.reshape(b, f, h * w, -1) + pos.to(x.dtype)).reshape(b, f * h * w, -1)
        freq = timestep.float()[:, None] * torch.exp(-torch.arange(16, dtype=torch.float32) * 0.5)[None]
        t = self.t_embed(torch.cat([freq.sin(), freq.cos()], dim=-1).to(x.dtype))
        if self.pattern == "branch" and fps > 12:
            t = t + self.fast_motion
        y = self.y_embed(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, y, t, f)
        x = self.out(x)
        if self.pattern == "frames":
            return x
        return x.reshape(b, f, h, w, c, p, p).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h * p, w * p)


# pattern: (the inputs read on the host, their first value, a second value)
PATTERNS = {
    "resolution": (("height", "width"), {"height": [64.0], "width": [64.0]}, {"height": [48.0], "width": [80.0]}),
    "frames": (("num_frames",), {"num_frames": 2}, {"num_frames": 4}),
    "branch": (("fps",), {"fps": [24.0]}, {"fps": [8.0]}),
}


def build_host_read(pattern: str, dtype=torch.float32, **values):
    """``(model, make_inputs)`` like ``adacache_fx.tools.fixtures.build``; ``values`` overrides the inputs read on the host."""
    torch.manual_seed(0)
    model = HostReadDiT(pattern).eval().to(dtype)
    names, first, _ = PATTERNS[pattern]
    values = {**first, **values}
    frames = int(values.get("num_frames", 2))
    shape = (1, frames * 16, 16) if pattern == "frames" else (1, 4, 2, 8, 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(2))
    direction = torch.randn(shape, generator=torch.Generator().manual_seed(3))

    def make_inputs(step: int = 0) -> dict:
        kwargs = {"hidden_states": (latents + 0.03 * step * direction).to(dtype),
                  "timestep": torch.tensor([999 - 33 * step]), "encoder_hidden_states": text.to(dtype)}
        kwargs.update({n: torch.tensor(values[n]).to(dtype if n != "num_frames" else torch.int64) for n in names})
        return kwargs

    return model, make_inputs


@pytest.fixture
def capture_log(caplog):
    caplog.set_level(logging.DEBUG, logger="adacache_fx.capture")
    return caplog


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_plain_torch_export_cannot_capture_them(pattern):
    """The reason for this feature: a failure, or (resolution) a graph that reads the inputs on the host."""
    model, make_inputs = build_host_read(pattern)
    if pattern == "resolution":
        program = torch.export.export(model, (), make_inputs(0), strict=False)
        assert any(n.target == torch.ops.aten.item.default for n in program.graph.nodes)
    else:
        with pytest.raises(torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode):
            torch.export.export(model, (), make_inputs(0), strict=False)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_never_skip_equals_the_model_and_specializes_what_is_read(pattern, capture_log):
    model, make_inputs = build_host_read(pattern)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=6, codebook=presets.NEVER))
    got = run_steps(cached, make_inputs, 6)
    expected = run_steps(model, make_inputs, 6)
    assert max_diff(got, expected) < 1e-5
    names = PATTERNS[pattern][0]
    assert cached.static_inputs == names  # timestep, also a small tensor, stays an input of the graph
    assert len(cached.programs) == 1 and ax.report(cached).computed_steps == list(range(1, 7))
    logged = [r.getMessage() for r in capture_log.records if r.name == "adacache_fx.capture"]
    assert any(f"specialized the inputs {list(names)} to their values" in message for message in logged)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_schedule_matches_reference(pattern):
    model, make_inputs = build_host_read(pattern)
    codebook = {t * 4.0: r for t, r in presets.FAST_30.items()}  # random weights: residuals change faster
    trajectory, _ = record_trajectory(model, make_inputs, 30)
    expected = schedule(trajectory, 30, codebook)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=30, codebook=codebook))
    outputs = run_steps(cached, make_inputs, 30)
    assert ax.report(cached).computed_steps == expected
    assert 3 < len(expected) < 30
    reference = hand_reference(model, make_inputs, 30, set(expected), "stack")
    assert max_diff(outputs, reference) < 1e-5


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_a_second_value_is_captured_separately(pattern):
    names, _, second = PATTERNS[pattern]
    model, make_inputs = build_host_read(pattern)
    _, make_second = build_host_read(pattern, **second)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, codebook=presets.NEVER))
    first = run_steps(cached, make_inputs, 4)
    got = run_steps(cached, make_second, 4)
    assert max_diff(got, run_steps(model, make_second, 4)) < 1e-5
    if first[0].shape == got[0].shape:  # the value alone matters (frames: the latents' shape follows it)
        assert max_diff(first, got) > 1e-3
    assert len(cached.programs) == 2
    run_steps(cached, make_inputs, 4)  # the first value again: no new capture
    assert len(cached.programs) == 2
    with torch.no_grad():  # a value changing in the middle of a generation is a signature change
        cached(**make_inputs(0))
        with pytest.raises(ValueError, match="signature changed in the middle of a generation"):
            cached(**make_second(1))


class CachedPosEmbedDiT(HostReadDiT):
    """Open-Sora's STDiT3 keeps its positional embeddings in a ``functools.lru_cache``."""

    @functools.lru_cache(maxsize=8)  # noqa: B019 - as the model does
    def pos_embed(self, h, w, scale, base_size):
        return super().pos_embed(h, w, scale, base_size)


def test_a_cache_in_the_forward_keeps_real_tensors():
    _, make_inputs = build_host_read("resolution")
    torch.manual_seed(0)
    model = CachedPosEmbedDiT("resolution").eval()
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, codebook=presets.NEVER))
    got = run_steps(cached, make_inputs, 4)  # the embedding is evaluated eagerly: the cache holds a real tensor
    assert max_diff(got, run_steps(model, make_inputs, 4)) < 1e-5
    assert cached.static_inputs == ("height", "width")


def test_named_static_inputs_are_specialized_without_a_failed_export(monkeypatch):
    model, make_inputs = build_host_read("frames")
    exports = []
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    config = ax.AdaCacheConfig(num_steps=4, codebook=presets.NEVER, static_inputs=("num_frames",))
    cached = ax.transform(model, config)
    assert max_diff(run_steps(cached, make_inputs, 4), run_steps(model, make_inputs, 4)) < 1e-5
    assert len(exports) == 1 and cached.static_inputs == ("num_frames",)
    _, make_second = build_host_read("frames", num_frames=4)
    run_steps(cached, make_second, 4)  # remembered: found inputs too are specialized on the first try
    assert len(exports) == 2


def test_found_inputs_are_remembered(monkeypatch):
    model, make_inputs = build_host_read("branch")
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, codebook=presets.NEVER))
    run_steps(cached, make_inputs, 1)
    exports = []
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    _, make_second = build_host_read("branch", fps=[8.0])
    ax.reset(cached)
    run_steps(cached, make_second, 1)
    assert len(exports) == 1


def test_bfloat16():
    model, make_inputs = build_host_read("resolution", dtype=torch.bfloat16)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, codebook=presets.NEVER))
    assert max_diff(run_steps(cached, make_inputs, 4), run_steps(model, make_inputs, 4)) < 2e-2
    assert cached.static_inputs == ("height", "width")


@pytest.mark.parametrize("pattern", ["resolution", "frames"])
def test_compile_fullgraph_without_graph_breaks(pattern):
    _, _, second = PATTERNS[pattern]
    model, make_inputs = build_host_read(pattern)
    _, make_second = build_host_read(pattern, **second)
    config = ax.AdaCacheConfig(num_steps=5, compute_steps=(1, 2, 5))
    eager = ax.transform(model, config)
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(ax.transform(model, config), backend=counter, fullgraph=True)
    for inputs in (make_inputs, make_second, make_inputs):
        assert max_diff(run_steps(compiled, inputs, 5), run_steps(eager, inputs, 5)) == 0.0
    assert counter.frame_count == 2  # one compilation per value
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert ax.report(compiled).computed_steps == [1, 2, 5]


def test_onnx_export_bakes_static_inputs_in(tmp_path):
    model, make_inputs = build_host_read("resolution")
    config = ax.AdaCacheConfig(num_steps=5, compute_steps=(1, 2, 5))
    cached = ax.transform(model, config)
    info = to_onnx(cached, make_inputs(0), tmp_path / "model.onnx")
    assert info.input_names == ["hidden_states", "timestep", "encoder_hidden_states"]
    inputs = {item["name"]: item for item in read_metadata(info.path)["inputs"]}
    assert inputs["height"] == {"name": "height", "kind": "static", "shape": [1], "dtype": "float32", "value": [64.0]}
    runner = OnnxRunner(info.path)
    expected = run_steps(ax.transform(model, config), make_inputs, 5)
    got = [first_tensor(runner(**make_inputs(s))) for s in range(5)]
    assert max_diff(got, expected) < 1e-4
    assert runner.report().computed_steps == [1, 2, 5]
    _, make_second = build_host_read("resolution", height=[48.0])
    with pytest.raises(ValueError, match=r"'height': this file was exported for the value \[64.0\].*got \[48.0\]"):
        runner(**make_second(0))


class ReadsItsLatents(nn.Module):
    """Python control flow on the value of a large input (more elements than inputs specialized
    automatically may have): nothing to specialize."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x, scale):
        if x.sum() > 0:
            x = x * scale
        for block in self.blocks:
            x = x + block(x)
        return x


def test_specializing_that_does_not_help_says_what_was_tried():
    cached = ax.transform(ReadsItsLatents(), ax.AdaCacheConfig(num_steps=4))
    with pytest.raises(ax.CaptureError, match=r"(?s)ReadsItsLatents.*Tried: the export was retried with the "
                                              r"inputs \['arg1'\] specialized.*What you can do"), torch.no_grad():
        cached(torch.randn(2, SPECIALIZE_MAX_NUMEL // 4, 4), torch.tensor(2.0))


def test_config_round_trip():
    config = ax.AdaCacheConfig(num_steps=30, static_inputs=["height", "width", "fps"])
    assert config.static_inputs == ("height", "width", "fps")
    assert ax.AdaCacheConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="static_inputs"):
        ax.AdaCacheConfig(static_inputs="height")


# -- a buffer rebuilt in the forward for another size: diffusers' CogVideoX positional embedding ----------
def cogvideox_at(frames: int, size: int):
    """Tiny CogVideoX (configured for 2 latent frames of 8 x 8) called with other latents."""
    model, make_inputs = build("cogvideox", num_layers=2)

    def resized(step: int = 0) -> dict:
        kwargs = make_inputs(step)
        g = torch.Generator().manual_seed(7)
        base = torch.randn(1, frames, 4, size, size, generator=g)
        kwargs["hidden_states"] = base + 0.02 * step * torch.randn(base.shape, generator=g)
        return kwargs

    return model, resized


@pytest.mark.parametrize("frames,size", [(3, 8), (2, 12)])
def test_cogvideox_at_another_size_never_skip_equals_the_model(frames, size):
    model, make_inputs = cogvideox_at(frames, size)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, codebook=presets.NEVER))
    assert max_diff(run_steps(cached, make_inputs, 4), run_steps(model, make_inputs, 4)) < 1e-5
    assert cached.static_inputs == ()


def test_cogvideox_at_another_size_caches():
    model, make_inputs = cogvideox_at(3, 12)
    steps = (1, 2, 4, 7, 8)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=8, compute_steps=steps, granularity="block"))
    got = run_steps(cached, make_inputs, 8)
    assert ax.report(cached).computed_steps == list(steps)
    assert max_diff(got, hand_reference(model, make_inputs, 8, set(steps), "block")) < 1e-5
    _, make_configured = build("cogvideox", num_layers=2)  # the configured size still works, captured apart
    ax.reset(cached)
    assert max_diff(run_steps(cached, make_configured, 8),
                    hand_reference(model, make_configured, 8, set(steps), "block")) < 1e-5
    assert len(cached.programs) == 2


class WritesThroughData(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(2, 4))

    def forward(self, x):
        table = x.new_zeros(x.shape[0], 4)
        table.data.copy_(x * 2)  # depends on the input: cannot be evaluated eagerly
        return x + table


class RebuildsFromItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = WritesThroughData()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return x


def test_an_untraceable_tensor_names_the_module_and_its_buffers():
    cached = ax.transform(RebuildsFromItsInput(), ax.AdaCacheConfig(num_steps=4))
    with pytest.raises(ax.CaptureError, match=r"embed\.lifted_tensor_0 in module embed \(WritesThroughData, buffers "
                                              r"\['table'\]\).*call the model at the size its config was built for"):
        with torch.no_grad():
            cached(torch.randn(2, 4))


class ReadsABuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("flag", torch.tensor(1.0))
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x, t):
        if self.flag > 0:  # a buffer read on the host: evaluated eagerly, no input specialized
            x = x * 2
        x = x + t
        for block in self.blocks:
            x = x + block(x)
        return x


def test_a_buffer_read_on_the_host_specializes_no_input():
    model = ReadsABuffer().eval()
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, codebook=presets.NEVER))
    inputs = [(torch.randn(2, 4), torch.tensor([float(s)])) for s in range(4)]
    with torch.no_grad():
        assert max(float((cached(x, t) - model(x, t)).abs().max()) for x, t in inputs) == 0.0
    assert cached.static_inputs == () and len(cached.programs) == 1
