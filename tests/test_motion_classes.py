"""The per-motion-class schedule table (``adacache-fx motion``): grouping, held-out calibration, a real run."""

from __future__ import annotations

import pytest
import torch

from adacache_fx import AdaCacheConfig
from adacache_fx.tools import motion_classes as mc
from adacache_fx.tools.reference import evaluation_captions


def test_summarize_groups_by_motion_class_with_medians():
    runs = [
        mc.CaptionRun("a", "still", 0.01, True, {"fast": 8}),
        mc.CaptionRun("b", "still", 0.03, False, {"fast": 10}),
        mc.CaptionRun("c", "still", 0.02, True, {"fast": 9}),
        mc.CaptionRun("d", "fast", 0.20, False, {"fast": 14}),
        mc.CaptionRun("e", "fast", 0.40, False, {"fast": 12}),
    ]
    table = mc.summarize(runs)
    assert list(table) == ["still", "fast"]  # classes in SPEED_CLASSES order, empty ones left out
    assert table["still"] == {"n": 3, "motion": 0.02, "ok": 2 / 3, "fast": 9}
    assert table["fast"] == {"n": 2, "motion": pytest.approx(0.30), "ok": 0.0, "fast": 13}
    lines = mc.format_table(table, 30).splitlines()
    assert lines[0].endswith("| fast: median computed / 30 |") and lines[2] == "| still | 3 | 0.0200 | 67% | 9 |"


def test_direction_confusion_counts_measured_against_captioned_directions():
    runs = [
        mc.CaptionRun("a", "fast", 0.1, False, {}, "left", "right", 3.0, 0.5),
        mc.CaptionRun("b", "slow", 0.1, True, {}, "left", "left", 1.0, 0.3),
        mc.CaptionRun("c", "still", 0.0, True, {}, None, None, 0.1, 0.2),
    ]
    lines = mc.direction_confusion(runs).splitlines()
    assert lines[2] == "| left | 1 | 1 | 0 | 0 | 0 | 2.00 | 0.40 |"  # rows without captions are left out
    assert lines[3] == "| still / none | 0 | 0 | 0 | 0 | 1 | 0.10 | 0.20 |" and len(lines) == 4


def test_calibration_captions_are_outside_the_evaluation_set():
    held_out = {c.text for c in evaluation_captions()}
    captions = mc.calibration_captions()
    assert len(captions) == mc.NUM_CALIBRATION_CAPTIONS == len(set(captions))
    assert not held_out & set(captions)


def test_frame_motion_is_the_mean_consecutive_frame_difference():
    frames = torch.zeros(3, 1, 2, 2)
    frames[1] += 0.5
    assert mc.frame_motion(frames) == 0.5  # |0.5 - 0| then |0 - 0.5|


def test_run_captions_counts_the_computed_steps_of_each_config():
    from adacache_fx.tools.reference.pipeline import ReferencePipeline

    pipe = ReferencePipeline.from_reference()
    pipe.set_progress_bar_config(disable=True)
    captions = [c for c in evaluation_captions(repeats=1)][::5][:2]
    configs = {"forced": AdaCacheConfig(num_steps=5, compute_steps=[1, 3, 5])}  # one capture: ~20 s
    baseline = pipe.transformer
    runs = mc.run_captions(pipe, captions, configs, steps=5, progress=lambda _: None)
    assert pipe.transformer is baseline
    assert [r.caption for r in runs] == [c.text for c in captions]
    assert [r.computed for r in runs] == [{"forced": 3}] * 2
    assert all(r.motion > 0 for r in runs)
    assert all(set(r.metric) == {"forced"} for r in runs)  # the mean metric its policy recorded


def test_follow_table_ranks_computed_steps_against_motion():
    assert mc.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert mc.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert mc.rank_correlation([1, 2, 3], [9, 9, 9]) != mc.rank_correlation([1, 2, 3], [9, 9, 9])  # NaN
    assert mc._ranks([5.0, 1.0, 5.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    runs = [
        mc.CaptionRun("a", "still", 0.01, True, {"fast": 8, "moreg": 8}, metric={"fast": 0.02, "moreg": 0.01}),
        mc.CaptionRun("b", "still", 0.02, True, {"fast": 9, "moreg": 9}, metric={"fast": 0.04, "moreg": 0.03}),
        mc.CaptionRun("c", "fast", 0.30, True, {"fast": 9, "moreg": 14}, metric={"fast": 0.03, "moreg": 0.2}),
    ]
    lines = mc.follow_table(runs).splitlines()
    assert lines[0] == ("| variant | rank correlation, computed steps vs motion | median metric, still | "
                        "median metric, fast |")
    assert lines[2] == "| fast | +0.87 | 0.03 | 0.03 |"
    assert lines[3] == "| moreg | +1.00 | 0.02 | 0.2 |"
