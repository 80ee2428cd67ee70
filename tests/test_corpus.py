"""The third-party corpus in CI: diffusers' own tiny test configurations of the video classes.

The whole corpus (every class, one subprocess each: 28 minutes on two cores) is ``adacache-fx corpus``
(results/corpus/corpus.md); here a fast subset of the video classes, one per mechanism, runs in this process with a few never-skip calls each: the transform with every step computed equals the model
(max diff 0 in float32), capture leaves the model as it found it, the default policy computes fewer than N
steps where the model's metric allows, and a second generation and a reset mid-generation reproduce the
schedule and the outputs. Configurations that fail today because of a core limitation are strict xfails
naming the mechanism: when the core handles it the xfail turns into a failure and is removed.
"""

import inspect

import pytest
import torch
from torch import nn

from adacache_fx.tools.cli import main
from adacache_fx.tools.corpus import CONFIGS, run_config, select
from adacache_fx.tools.corpus.inputs import Timestep, materialize
from adacache_fx.tools.corpus.runner import _buffer_marks, _state_check

diffusers = pytest.importorskip("diffusers")

NUM_STEPS = 10
NEVER_SKIP_CALLS = 3

#: Video configurations the core cannot transform yet, with the mechanism each hits (diffusers 0.42.1).
CORE_LIMITS = {
    "WanAnimate2Transformer": "non-tensor input: a Python KV-cache object (WanAnimate2KVCache, "
    "transformer_wan_animate_2.py:140) that the forward fills (kv_cache.store, :199); torch.export refuses the "
    "input type, so capture fails with a CaptureError",
}

# Every video configuration's default schedule computes fewer than N steps. (Image ones that do not:
# Flux2, AuraFlow and NucleusMoE, whose random weights change more per step than the fast codebook's last
# threshold.) Cosmos3Omni's and Kandinsky 5's outputs do not move with the timestep at these sizes (metric 0
# on every step): their skips hold, but say nothing about the metric.
#: One configuration per mechanism, the fast ones (seconds each): 3D patch embedding with rotary (Allegro),
#: a text stream joined to the video stream (CogVideoX), a Wan-class model (ChronoEdit), a Hunyuan-class one
#: with image conditioning (HunyuanVideoI2V), a model whose forward changes its own state (AnyFlow), factorized
#: spatial/temporal blocks (Latte), another text-joined one (EasyAnimate), and the known core limit.
CI_VIDEO = ("AllegroTransformer", "CogVideoXTransformer", "ChronoEditTransformer", "HunyuanVideoI2VTransformer",
            "AnyFlowTransformer3D", "LatteTransformer", "EasyAnimateTransformer", "WanAnimate2Transformer")
VIDEO = [c for c in select(video=True) if not c.skip and c.name in CI_VIDEO]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as `adacache-fx corpus` runs: these tiny models run several times slower with two
    threads on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("config", [pytest.param(c, id=c.name) for c in VIDEO])
def test_video_class_is_exact_stateless_and_skips(config):
    result = run_config(config, num_steps=NUM_STEPS, never_skip_calls=NEVER_SKIP_CALLS)
    if config.name in CORE_LIMITS:  # the named refusal, not any failure; when the core handles it, remove it
        assert result.error_class == "CaptureError" and "WanAnimate2KVCache" in result.error, CORE_LIMITS[config.name]
        return
    assert result.error is None, f"{result.stage} ({result.phase}): {result.error_class}: {result.error}"
    assert result.never_skip_diff <= config.tolerance
    assert result.never_skip_computed == list(range(1, NEVER_SKIP_CALLS + 1))
    assert result.state_checked and result.state_changes == []
    assert result.computed[:2] == [1, 2] and result.computed[-2:] == [NUM_STEPS - 1, NUM_STEPS]
    assert len(result.computed) < NUM_STEPS, result.metrics
    assert result.computed_diff <= config.tolerance  # a compute step runs the whole model
    assert result.repeat_ok and result.reset_ok
    assert result.warnings == []
    assert result.status == "pass"


def test_every_configuration_names_a_class_and_its_inputs():
    names = [c.name for c in CONFIGS]
    assert len(VIDEO) == len(CI_VIDEO)
    assert len(names) == len(set(names)) >= 65
    for config in CONFIGS:
        forward = inspect.signature(getattr(diffusers, config.cls).forward).parameters
        assert set(config.inputs) <= set(forward), config.name
        assert "return_dict" in forward
        assert isinstance(config.inputs[config.timestep], Timestep), config.name
        assert config.source.startswith("tests/"), config.name


def test_inputs_follow_the_schedule_and_nothing_else_changes():
    config = next(c for c in CONFIGS if c.name == "WanTransformer3D")
    a, b = materialize(config.inputs, 1.0), materialize(config.inputs, 0.5)
    assert a["timestep"].tolist() == [999] and b["timestep"].tolist() == [500]
    assert torch.equal(a["hidden_states"], b["hidden_states"])


def test_state_check_tells_capture_side_effects_from_the_model_own():
    def pair():
        a, b = nn.Module(), nn.Module()
        for m in (a, b):
            m.register_buffer("cache", torch.zeros(2))
        return a, b, _buffer_marks(a), _buffer_marks(b)

    transformed, eager, marks_t, marks_e = pair()
    transformed.cache.add_(1)  # written by the capture, not by the model's own forward
    assert _state_check(transformed, eager, marks_t, marks_e) == (
        ["buffer cache written (the model's own forward does not write it)"], [])
    transformed, eager, marks_t, marks_e = pair()
    transformed.cache.add_(1), eager.cache.add_(2)  # both write it, with other values
    assert _state_check(transformed, eager, marks_t, marks_e)[0] == [
        "buffer cache written with other values than the model's own forward writes"]
    transformed, eager, marks_t, marks_e = pair()
    transformed.cache.add_(1), eager.cache.add_(1)  # a lazy cache filled as the model fills it
    assert _state_check(transformed, eager, marks_t, marks_e) == ([], [])
    transformed, eager, marks_t, marks_e = pair()
    eager.cache = torch.ones(2)  # the eager forward replaces it; the transform left it as found
    assert _state_check(transformed, eager, marks_t, marks_e) == ([], ["buffer cache"])


def test_cli_corpus_prints_a_row_and_writes_the_table(tmp_path, capsys):
    assert main(["corpus", "--only", "DiTTransformer2D", "--steps", "6", "--never-skip-calls", "2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[1/1] DiTTransformer2D" in out
    row = next(line for line in out.splitlines() if line.startswith("| DiTTransformer2D |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[3] == "pass" and cells[4] == "0" and cells[5] == "unchanged"
    assert cells[6].startswith(("3/6", "4/6", "5/6"))
    assert "Command: `adacache-fx corpus --only DiTTransformer2D --steps 6 --never-skip-calls 2" in \
        (tmp_path / "corpus.md").read_text()
    csv_lines = (tmp_path / "corpus.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,cls,video,source,status") and csv_lines[1].startswith("DiTTransformer2D,")


def test_help_describes_the_corpus_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "corpus" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["corpus", "--help"])
    out = capsys.readouterr().out
    assert "diffusers' test suite" in out and "--only" in out and "--video" in out and "--compile" in out


def test_cli_corpus_onnx_exports_and_runs_a_configuration(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert main(["corpus", "--only", "DiTTransformer2D", "--steps", "6", "--never-skip-calls", "2", "--onnx",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| DiTTransformer2D |"))
    assert "| pass, same steps, diff " in row
    assert "ONNX Runtime: 1 of 1 exported and ran with the same steps" in out
