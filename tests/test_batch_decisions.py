"""Per-video decisions in a batch (``batch_decisions="per_sample"``): every row's computed steps and
output equal that video run alone (within batched-matmul rounding), where a shared decision does not;
eager, compiled fullgraph, ONNX Runtime, block granularity; refusals named."""

import copy
from dataclasses import replace

import pytest
import torch
import torch._dynamo.testing
from helpers import run_steps

import adacache_fx as ax
from adacache_fx.tools.fixtures import build

N = 20
# the smooth video's metric sits near 0.12 - 0.27, the noisy one's near 0.35 - 0.57 (tiny Wan, 2 layers)
CODEBOOK = {0.3: 3, 0.45: 2, 1.0: 1}
ROUNDING = 1e-5  # a batch of two runs other matmul blockings than one video


@pytest.fixture(scope="module")
def videos():
    return make_videos()


def make_videos():
    """``(model, inputs_a, inputs_b, inputs_ab)``: a smooth video, a noisy one, and the two as a batch."""
    model, make_inputs = build("wan", num_layers=2)
    text_b = torch.randn(make_inputs(0)["encoder_hidden_states"].shape, generator=torch.Generator().manual_seed(7))

    def inputs_b(s):
        k = dict(make_inputs(s))
        noise = torch.randn(k["hidden_states"].shape, generator=torch.Generator().manual_seed(5000 + s))
        k["hidden_states"] = k["hidden_states"] + 0.5 * noise
        k["encoder_hidden_states"] = text_b
        return k

    def inputs_ab(s):
        a, b = make_inputs(s), inputs_b(s)
        return {k: torch.cat([a[k], b[k]]) if isinstance(a[k], torch.Tensor) else a[k] for k in a}

    return model, make_inputs, inputs_b, inputs_ab


def solo(model, make_inputs, **options):
    cached = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(num_steps=N, codebook=CODEBOOK, **options))
    return run_steps(cached, make_inputs, N), ax.report(cached).computed_steps


def rows_diff(outputs, expected, row):
    return max(float((o[row : row + 1] - e).abs().max()) for o, e in zip(outputs, expected))


@pytest.mark.parametrize("granularity", ["stack", "block"])
def test_each_row_decides_as_its_video_alone_where_shared_does_not(videos, granularity):
    model, inputs_a, inputs_b, inputs_ab = videos
    (out_a, steps_a), (out_b, steps_b) = (solo(model, f, granularity=granularity) for f in (inputs_a, inputs_b))
    assert steps_a != steps_b and len(steps_a) < N and len(steps_b) < N  # the two videos need other steps
    cached = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(
        num_steps=N, codebook=CODEBOOK, granularity=granularity, batch_decisions="per_sample"))
    outputs = run_steps(cached, inputs_ab, N)
    report_a, report_b = ax.report(cached)
    assert report_a.computed_steps == steps_a and report_b.computed_steps == steps_b
    assert rows_diff(outputs, out_a, 0) < ROUNDING and rows_diff(outputs, out_b, 1) < ROUNDING
    state = cached.state()
    assert state["rate"].shape == (2,) and state["history"].shape == (N, 2, 4)

    shared = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(num_steps=N, codebook=CODEBOOK,
                                                                  granularity=granularity))
    outputs = run_steps(shared, inputs_ab, N)
    assert max(rows_diff(outputs, out_a, 0), rows_diff(outputs, out_b, 1)) > 1e-3  # someone's steps were skipped


def test_compiled_fullgraph_and_onnx(videos, tmp_path):
    model, inputs_a, inputs_b, inputs_ab = videos
    expected = [solo(model, f) for f in (inputs_a, inputs_b)]
    cached = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(num_steps=N, codebook=CODEBOOK,
                                                                  batch_decisions="per_sample"))
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(cached, backend=counter, fullgraph=True)
    outputs = run_steps(compiled, inputs_ab, N)
    assert counter.frame_count == 1
    for row, (out, steps) in enumerate(expected):
        assert ax.report(cached)[row].computed_steps == steps
        assert rows_diff(outputs, out, row) < ROUNDING

    pytest.importorskip("onnxruntime")
    from adacache_fx.export import OnnxRunner, to_onnx

    fresh = ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(num_steps=N, codebook=CODEBOOK,
                                                                 batch_decisions="per_sample"))
    to_onnx(fresh, (), tmp_path / "batch.onnx", kwargs=inputs_ab(0))
    runner = OnnxRunner(tmp_path / "batch.onnx")
    outputs = run_steps(runner, inputs_ab, N)
    for row, (out, steps) in enumerate(expected):
        assert runner.report()[row].computed_steps == steps
        assert rows_diff(outputs, out, row) < ROUNDING


def test_bf16_rows_decide_in_float32(videos):
    model, inputs_a, _, inputs_ab = videos
    model = copy.deepcopy(model).to(torch.bfloat16)

    def cast(make):
        return lambda s: {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                          for k, v in make(s).items()}

    solos = [solo(model, cast(make)) for make in (inputs_a, videos[2])]
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=N, codebook=CODEBOOK, batch_decisions="per_sample"))
    outputs = run_steps(cached, cast(inputs_ab), N)
    assert all(o.dtype == torch.bfloat16 for o in outputs)
    for row, (report, (out, steps)) in enumerate(zip(ax.report(cached), solos)):
        assert report.row == row and report.computed_steps == steps and report.num_computed < N
        assert all(r["metric"] is not None for r in report.steps if r.computed and r.step > 1)  # float32, finite
        assert rows_diff(outputs, out, row) <= 2**-6  # at most a bf16 rounding step apart


@pytest.mark.parametrize("config", [
    ax.AdaCacheConfig(num_steps=N, codebook=CODEBOOK, moreg=ax.MoRegConfig()),  # motion measured per row
    ax.AdaCachePlusConfig(num_steps=N, threshold=0.5),
    ax.TeaCacheConfig(num_steps=N, threshold=0.3),  # an early signal, kept per row
    ax.FirstBlockCacheConfig(num_steps=N, threshold=0.2),
    ax.EasyCacheConfig(num_steps=N, threshold=0.3),
], ids=lambda c: type(c).__name__)
def test_every_policy_decides_per_row(videos, config):
    model, inputs_a, inputs_b, inputs_ab = videos
    expected = []
    for make in (inputs_a, inputs_b):
        cached = ax.transform(copy.deepcopy(model), config)
        expected.append((run_steps(cached, make, N), ax.report(cached).computed_steps))
    assert min(len(steps) for _, steps in expected) < N  # one of the videos skips
    assert expected[0][1] != expected[1][1]  # the two videos need other steps
    cached = ax.transform(copy.deepcopy(model), replace(config, batch_decisions="per_sample"))
    outputs = run_steps(cached, inputs_ab, N)
    for row, (out, steps) in enumerate(expected):
        assert ax.report(cached)[row].computed_steps == steps
        assert rows_diff(outputs, out, row) < ROUNDING


@pytest.mark.parametrize("config,match", [
    (ax.AdaCacheConfig(num_steps=6, extrapolation_order=1, batch_decisions="per_sample"), "forecast"),
])
def test_what_is_not_per_row_yet_is_refused_by_name(videos, config, match):
    model, _, _, inputs_ab = videos
    cached = ax.transform(copy.deepcopy(model), config)
    with pytest.raises(ax.TransformError, match=match), torch.no_grad():
        cached(**inputs_ab(0))


def test_bad_value_is_refused():
    with pytest.raises(ValueError, match="batch_decisions must be one of"):
        ax.AdaCacheConfig(batch_decisions="rows")


def test_reference_model_batch_of_four_captions_decides_per_video():
    """The bundled reference model, 4 videos with different captions and seeds in one batch, N = 20: under
    per-sample decisions each video computes the steps it computes alone, its output within the rounding
    of the batched uncached model; a shared-decision batch forces one schedule on all four and moves them."""
    import copy

    from adacache_fx.tools import reference as ref

    model, encoder = ref.load_reference_model()
    captions = ["a red circle staying still", "a small blue square moving left slow",
                "a large green triangle moving up fast", "a yellow circle moving down fast"]
    steps = 20

    def generate(cached, rows):
        text = encoder.encode_conditioning([captions[i] for i in rows])
        x = torch.cat([torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(i)) for i in rows])
        if cached is not model:
            ax.reset(cached, num_steps=steps)
        with torch.no_grad():
            for s in range(steps):
                sigma, following = 1 - s / steps, 1 - (s + 1) / steps
                x = x + (following - sigma) * cached(x, torch.full((len(rows),), sigma * 1000.0), **text,
                                                     return_dict=False)[0]
        return x

    def transformed(decisions):
        return ax.transform(copy.deepcopy(model), ax.AdaCacheConfig(num_steps=steps, batch_decisions=decisions))

    rounding = float((generate(model, range(4)) - torch.cat([generate(model, [i]) for i in range(4)])).abs().max())
    alone, schedules = [], []
    for i in range(4):
        cached = transformed("shared")
        alone.append(generate(cached, [i]))
        schedules.append(ax.report(cached).computed_steps)
    assert len({tuple(s) for s in schedules}) >= 3  # the videos want different schedules
    per_sample = transformed("per_sample")
    batch = generate(per_sample, range(4))
    assert [r.computed_steps for r in ax.report(per_sample)] == schedules
    diffs = [float((batch[i] - alone[i][0]).abs().max()) for i in range(4)]
    # batching changes the float rounding; a cached run carries it in its residuals over 20 steps (bundled v2
    # weights: 2.2e-6 to 5.6e-5 per video, 2.3e-5 for the uncached batch; v1: 1.6e-5 and 2.7e-5)
    assert max(diffs) <= 5 * rounding, (diffs, rounding)
    shared = transformed("shared")
    batch = generate(shared, range(4))
    forced = ax.report(shared).computed_steps
    moved = [float((batch[i] - alone[i][0]).abs().max()) for i in range(4) if schedules[i] != forced]
    assert moved and min(moved) > 100 * max(diffs)


def test_magcache_rows_keep_their_own_state():
    """MagCache decides from its calibrated ratios alone (no metric of the video), so per sample every row
    takes the schedule it takes alone; each row's accumulated error, run and output are its own."""
    model, inputs_a, inputs_b, inputs_ab = make_videos()
    ratios = [1.0] + [0.97 - 0.01 * s for s in range(N - 1)]
    config = ax.MagCacheConfig(num_steps=N, mag_ratios=ratios, threshold=0.2, max_skip_steps=3)
    expected = []
    for make in (inputs_a, inputs_b):
        cached = ax.transform(copy.deepcopy(model), config)
        expected.append((run_steps(cached, make, N), ax.report(cached).computed_steps))
    assert len(expected[0][1]) < N
    cached = ax.transform(copy.deepcopy(model), replace(config, batch_decisions="per_sample"))
    outputs = run_steps(cached, inputs_ab, N)
    assert cached.state()["history"].shape[1] == 2  # a history row per video
    for row, (out, steps) in enumerate(expected):
        assert ax.report(cached)[row].computed_steps == steps
        assert rows_diff(outputs, out, row) < ROUNDING
