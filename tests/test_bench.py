"""adacache_fx.tools.bench: the quick mode on an untrained reference pipeline, the caption set, the summaries."""

import argparse
import csv
import importlib.util
import math
from collections import Counter

import pytest
import torch

from adacache_fx.tools import bench
from adacache_fx.tools.bench import (
    CALIBRATION_CAPTIONS,
    COLUMNS,
    EVAL_CAPTIONS,
    QUICK_METHODS,
    QUICK_STEPS,
    Row,
    run_bench,
    static_schedule,
    summarize_targets,
)
from adacache_fx.tools.fixtures import untrained_reference_pipeline
from adacache_fx.tools.reference import parse_caption


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    pipe = untrained_reference_pipeline()
    base = pipe.transformer
    rows = run_bench(quick=True, out=out, pipe=pipe, progress=lambda _: None)
    assert pipe.transformer is base  # restored
    return {(r.method, r.setting): r for r in rows}, rows, out


def _row(rows, method) -> Row:
    (row,) = [r for (m, _), r in rows.items() if m == method]
    return row


def test_quick_writes_csv_markdown_and_plot(quick):
    by_key, rows, out = quick
    with open(out / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS
    methods = [bench.BASELINE] + [bench.METHODS[k][0] for k in QUICK_METHODS]
    assert [r["method"] for r in table] == methods  # one quick setting per method
    assert table[0]["psnr"] == "inf"
    markdown = (out / "bench.md").read_text()
    assert markdown.count("\n| ") == len(rows) + 1 and "## Targets" in markdown
    assert "Held-out split: rows are measured on the evaluation captions" in markdown
    assert all(m in markdown for m in methods)
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_baseline_and_never_skipping_rows_are_exact(quick):
    rows = quick[0]
    base = _row(rows, bench.BASELINE)
    assert (base.speedup, base.psnr, base.ssim, base.computed, base.cache_mib) == (1.0, math.inf, 1.0, QUICK_STEPS, 0)
    never = _row(rows, "adacache-fx never")
    assert never.psnr == math.inf and never.computed == QUICK_STEPS and never.ssim == 1.0
    assert never.cache_mib > 0  # the residual caches of both CFG contexts


def test_schedules_count_what_really_ran(quick):
    rows = quick[0]
    static = _row(rows, "adacache-fx static")
    assert static.computed == len(static_schedule(QUICK_STEPS, 2)) == 6  # steps 1 3 5 7 9 10
    assert math.isfinite(static.psnr) and static.speedup > 1
    fast = _row(rows, "adacache-fx fast")
    assert 3 <= fast.computed < QUICK_STEPS and math.isfinite(fast.psnr)
    # warm-up of round(10 / 6) = 2 steps, then a calibrated codebook with rates <= 4, extrapolating
    warm = _row(rows, "adacache-fx calibrated+warm-up+linear")
    assert 4 <= warm.computed < QUICK_STEPS and math.isfinite(warm.psnr) and "warm-up 2" in warm.setting
    # it keeps a second residual ([1, 512, 128] float32) per CFG context
    assert warm.cache_mib >= _row(rows, "adacache-fx never").cache_mib + 2 * 512 * 128 * 4 / 2**20
    # TaylorSeer, interval 3, 3 warm-up steps: steps 0 1 2 4 7 compute (counted on the middle block)
    taylor = _row(rows, "diffusers TaylorSeer")
    assert taylor.computed == 5
    # its state: order-0 and order-1 factors of 6 block outputs [1, 512, 128] float32, per CFG context
    assert taylor.cache_mib == pytest.approx(2 * 6 * 2 * 512 * 128 * 4 / 2**20)
    for method in ("diffusers FirstBlockCache", "cache-dit DBCache"):
        row = _row(rows, method)
        if method.startswith("cache-dit") and importlib.util.find_spec("cache_dit") is None:
            assert "not installed" in row.note
            continue
        assert 1 <= row.computed <= QUICK_STEPS and row.psnr > 10


def test_a_method_that_cannot_run_gets_a_reason(quick):
    row = _row(quick[0], "diffusers FasterCache")
    assert row.speedup is None and row.psnr is None
    assert "batch" in row.note and "Error" in row.note


def test_eval_captions_are_balanced_and_held_out():
    caps = [parse_caption(c) for c in EVAL_CAPTIONS]
    assert len(caps) >= 24 and len(set(EVAL_CAPTIONS)) == len(EVAL_CAPTIONS)
    assert set(Counter(c.speed for c in caps).values()) == {8}
    assert set(Counter(c.direction for c in caps if c.direction).values()) == {4}
    assert set(Counter((c.direction, c.speed) for c in caps if c.direction).values()) == {2}
    assert set(Counter(c.shape for c in caps).values()) == {8}
    assert set(Counter(c.colour for c in caps).values()) == {4}
    assert set(Counter(c.size for c in caps).values()) == {12}
    assert not set(CALIBRATION_CAPTIONS) & set(EVAL_CAPTIONS)
    assert bench.eval_captions() == EVAL_CAPTIONS  # deterministic


def test_summary_compares_peers_with_the_best_adacache_curve():
    rows = [
        Row("no caching", "-", 30, 30, 1.0, 1.0, math.inf),
        Row("adacache-fx fast", "x1", 30, 12, 2.2, 1.0, 31.0),
        Row("adacache-fx calibrated", "3x", 30, 9, 2.9, 1.0, 24.0),
        Row("adacache-fx MagCache rule", "0.2", 30, 12, 2.0, 1.0, 40.0),  # a peer's rule: not the family
        Row("peer", "a", 30, 15, 1.8, 1.0, 33.0),
        Row("peer", "b", 30, 10, 2.5, 1.0, 20.0),
        Row("peer", "c", 30, 8, 3.5, 1.0, 18.0),
        Row("peer", "broken", 30, note="cannot run"),
        Row("adacache-fx fast compiled", "x1", 30, 12, 1.5, 1.0, 31.0, compiled=True),
        Row("peer compiled", "a", 30, None, 1.4, 1.0, 35.0, compiled=True),
    ]
    assert [(r.method, r.setting) for r in bench.best_curve(rows)] == [
        ("adacache-fx MagCache rule", "0.2"), ("adacache-fx fast", "x1"), ("adacache-fx calibrated", "3x")]
    assert [(r.method, r.setting) for r in bench.best_curve(rows, family_only=True)] == [
        ("adacache-fx fast", "x1"), ("adacache-fx calibrated", "3x")]
    assert [r.method for r in bench.best_curve(rows, compiled=True)] == ["adacache-fx fast compiled"]
    text = summarize_targets(rows)
    assert "**met**" in text and "best PSNR: adacache-fx fast [x1] 2.20x" in text
    # below the family curve's slowest point: that point; between points: linear (31 + (24 - 31) * 0.3 / 0.7 = 28)
    assert ("peer [a] 1.80x / 33.00 dB: best curve 40.00 dB (adacache-fx MagCache rule [0.2] 2.00x): equal or "
            "higher; AdaCache family 31.00 dB (adacache-fx fast [x1] 2.20x): **lower by 2.00 dB**.") in text
    # the best curve is the upper envelope of the lines between its points: 40 + (24 - 40) * 0.5 / 0.9 = 31.11
    assert "peer [b] 2.50x / 20.00 dB: best curve 31.11 dB (between adacache-fx MagCache rule [0.2] 2.00x and" in text
    assert "AdaCache family 28.00 dB (between adacache-fx fast [x1] 2.20x and" in text
    assert "peer [c] 3.50x / 18.00 dB: best curve: reaches no such speedup" in text
    # compiled peers are compared with the compiled adacache-fx rows only
    assert "peer compiled [a] 1.40x / 35.00 dB: best curve 31.00 dB (adacache-fx fast compiled [x1] 1.50x): **lower by 4.00 dB**" in text
    assert "broken" not in text and "no caching" not in text


def test_rows_round_trip_through_the_csv(tmp_path):
    rows = [Row("no caching", "-", 30, 30.0, 1.0, 2.5, math.inf, 1.0, 0.5, 0.0, 0),
            Row("peer", "x", 30, note="cannot run"),
            Row("peer compiled", "x", 30, None, 1.5, 1.0, 30.0, compiled=True)]
    bench.write_outputs(rows, tmp_path, ["a"], [0], 30)
    assert bench.load_rows(tmp_path / "bench.csv") == rows


def test_cli_runs_a_quick_subset(tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    args = parser.parse_args(["--quick", "--untrained", "--methods", "fbcache", "--captions", "1",
                              "--steps", "4", "--out", str(tmp_path)])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the test session's threads
    assert bench.cli_bench(args) == 0
    out = capsys.readouterr().out
    assert "| diffusers FirstBlockCache | threshold 0.1 | " in out and "4.0/4" in out
    assert (tmp_path / "bench.csv").exists()


def test_compiled_rows_are_timed_against_the_compiled_uncached_model(tmp_path, monkeypatch):
    """The harness's compiled path (Dynamo's ``eager`` backend stands in for inductor here): a compiled
    peer and the compiled uncached model, speedups against the latter, graph breaks counted while compiling."""
    import functools

    import torch._dynamo

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(compile_, backend="eager"))
    torch._dynamo.reset()
    rows = run_bench(["a small red circle moving left fast"], [0], 4, ["adacache-compiled", "fbcache-compiled", "pab-compiled"],
                     out=tmp_path, pipe=untrained_reference_pipeline(), graph_breaks=False, progress=lambda _: None)
    torch._dynamo.reset()
    by_method = {r.method: r for r in rows}
    base = by_method["no caching compiled"]
    assert base.compiled and base.speedup == 1.0 and "the speed of the uncached eager model" in base.note
    assert base.graph_breaks == 0 and by_method["adacache-fx compiled"].graph_breaks == 0  # fullgraph
    for name in ("diffusers FirstBlockCache compiled", "diffusers PAB compiled"):
        peer = by_method[name]
        assert peer.compiled and peer.computed is None and peer.graph_breaks > 0  # its hooks decide in Python
    assert not by_method["no caching"].compiled and by_method["no caching"].speedup == 1.0
    assert [r.compiled for r in bench.load_rows(tmp_path / "bench.csv")] == [r.compiled for r in rows]


@pytest.mark.parametrize("steps,interval", [(10, 3), (13, 4)])
def test_taylorseer_schedule_row_computes_taylorseers_steps_and_forecasts(tmp_path, steps, interval, monkeypatch):
    """adacache-fx on TaylorSeer's schedule: the steps diffusers' TaylorSeer hook computes (probed on the
    middle block, per CFG call) are ``taylorseer_schedule``'s, and our row computes exactly those."""
    from diffusers.hooks import TaylorSeerCacheConfig

    pipe = untrained_reference_pipeline()
    base = pipe.transformer
    calls, computed = [0], []
    mid = base.blocks[len(base.blocks) // 2].attn1.to_q
    step_hook = base.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    probe = mid.register_forward_hook(lambda *_: computed.append(calls[0]))
    base.enable_cache(TaylorSeerCacheConfig(cache_interval=interval, max_order=1, cache_identifiers=[r"blocks\.\d+"]))
    try:
        pipe("a small red circle moving left fast", num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    finally:
        base.disable_cache()
        step_hook.remove()
        probe.remove()
    hook_steps = tuple(sorted({(call + 1) // 2 for call in computed}))  # two CFG calls per step
    assert hook_steps == bench.taylorseer_schedule(steps, interval)
    monkeypatch.setitem(bench.METHODS, "adacache-taylorseer-schedule",
                        (bench.METHODS["adacache-taylorseer-schedule"][0], (interval,), (interval,)))
    (_, row) = run_bench(["a small red circle moving left fast"], [0], steps, ["adacache-taylorseer-schedule"],
                         out=tmp_path, pipe=pipe, graph_breaks=False, progress=lambda _: None)
    assert row.computed == len(hook_steps) and row.setting == f"interval {interval}, order 1"
    assert math.isfinite(row.psnr)


def test_easycache_row_computes_what_the_policy_computes_and_is_not_in_the_family(tmp_path, monkeypatch):
    """The EasyCache rows run the policy as a user would (the same steps as ``transform`` with its config in
    the same pipeline), and count as a peer's rule in the summaries, not as the AdaCache family."""
    import adacache_fx as ax
    from adacache_fx.tools.bench.report import _family

    caption, steps = "a small red circle moving left fast", 12
    pipe = untrained_reference_pipeline()
    base = pipe.transformer
    monkeypatch.setitem(bench.METHODS, "adacache-easycache", (bench.METHODS["adacache-easycache"][0], (0.5,), (0.5,)))
    _, row = run_bench([caption], [0], steps, ["adacache-easycache"], out=tmp_path, pipe=pipe, graph_breaks=False,
                       progress=lambda _: None)
    assert row.method == "adacache-fx EasyCache rule" and row.setting == "threshold 0.5" and not _family(row)

    pipe.transformer = ax.transform(base, ax.EasyCacheConfig(num_steps=steps, threshold=0.5))
    pipe(caption, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    counts = [ax.report(pipe.transformer, c).num_computed for c in ("cond", "uncond")]
    assert row.computed == sum(counts) / 2 < steps and math.isfinite(row.psnr)
