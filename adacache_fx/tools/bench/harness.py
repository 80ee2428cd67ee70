"""The bench run: the pipeline and its probes, one untimed warm-up per setting, round-robin timed runs per
caption, aggregation into rows (see the package docstring for what each column measures)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch._dynamo

from ...calibrate import record_metrics
from ..metrics import psnr, ssim
from .captions import CALIBRATION_CAPTIONS, EVAL_CAPTIONS, QUICK_CAPTIONS, QUICK_STEPS
from .graph_breaks import add_graph_breaks
from .memory import held_storages, sample_held
from .registry import METHODS, QUICK_METHODS, Setting, settings_of
from .report import write_outputs
from .rows import BASELINE, COMPILED_BASELINE, Row


class Bench:
    """The pipeline, its uncached transformer, and the probes the peers are measured with."""

    def __init__(self, pipe, steps: int, quick: bool, progress: Callable[[str], None]):
        self.pipe, self.steps, self.quick, self.progress = pipe, steps, quick, progress
        self.base = pipe.transformer
        self.calls = 0
        self.calls_per_step = 2.0  # replaced by the uncached count
        self._cal: dict[str, object] = {}
        self._held_at_start = held_storages(pipe)

    def generate(self, caption: str, seed: int, steps: int | None = None) -> torch.Tensor:
        """One video ``[T, C, H, W]`` in [0, 1]."""
        generator = torch.Generator().manual_seed(seed)
        return self.pipe(caption, num_inference_steps=steps or self.steps, generator=generator).frames[0]

    @contextlib.contextmanager
    def probes(self):
        """Count executions of the first attention query projection of the middle block of the model's
        first block list (``blocks`` of a Wan, ``transformer_blocks`` of a HunyuanVideo)."""
        blocks = next(m for name, m in self.base.named_children()
                      if name.endswith("blocks") and isinstance(m, torch.nn.ModuleList))
        mid = blocks[len(blocks) // 2]
        query = next(m for name, m in mid.named_modules() if name.endswith("to_q"))

        def count(*_):
            self.calls += 1

        handle = query.register_forward_hook(count)
        try:
            yield
        finally:
            handle.remove()

    def held_bytes(self) -> int:
        """Bytes of tensors reachable from the pipeline now that were not there uncached (see module doc)."""
        return sum(n for ptr, n in held_storages(self.pipe).items() if ptr not in self._held_at_start)

    # -- calibrations, on the held-out captions --------------------------------------------------------
    def trajectories(self):
        if "traj" not in self._cal:
            captions = CALIBRATION_CAPTIONS[:1] if self.quick else CALIBRATION_CAPTIONS
            self.progress(f"calibrating adacache-fx codebooks on {len(captions)} held-out caption(s)")
            self._cal["traj"] = record_metrics(self.pipe, captions, self.steps)
        return self._cal["traj"]

    def mag_ratios(self) -> list[float]:
        """MagCache's magnitude ratios from its own calibration mode (it prints them; averaged over runs)."""
        if "mag" not in self._cal:
            from diffusers.hooks import MagCacheConfig

            captions = CALIBRATION_CAPTIONS[:1] if self.quick else CALIBRATION_CAPTIONS
            self.progress(f"calibrating MagCache ratios on {len(captions)} held-out caption(s)")
            runs = []
            for i, caption in enumerate(captions):
                printed = io.StringIO()
                self.base.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=self.steps))
                try:
                    with contextlib.redirect_stdout(printed):
                        self.generate(caption, i)
                finally:
                    self.pipe.maybe_free_model_hooks()
                    self.base.disable_cache()
                lines = [line.strip() for line in printed.getvalue().splitlines()]
                runs += [json.loads(line) for line in lines if line.startswith("[") and line.endswith("]")]
            self._cal["mag"] = np.mean(runs, axis=0).tolist()
        return self._cal["mag"]



def run_bench(
    captions: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    steps: int | None = None,
    methods: Sequence[str] | None = None,
    quick: bool = False,
    out: Path | str = "adacache-fx-bench",
    pipe=None,
    graph_breaks: bool | None = None,
    progress: Callable[[str], None] = print,
    description: str = "",
) -> list[Row]:
    """Run the benchmark and write ``bench.csv``, ``bench.md`` and ``pareto.png`` into ``out``.

    Defaults: :data:`EVAL_CAPTIONS`, seed 0, 30 steps, every method in :data:`METHODS` (``quick``:
    :data:`QUICK_CAPTIONS`, 10 steps, :data:`QUICK_METHODS` with one setting each). ``pipe``: a
    ``ReferencePipeline`` (default: the bundled trained weights). ``graph_breaks``: count graph breaks per
    method (default: not in quick mode). ``description``: a line for the Markdown header (e.g. the weights).
    """
    captions = list(captions or (QUICK_CAPTIONS if quick else EVAL_CAPTIONS))
    seeds = list(seeds if seeds is not None else (0,))
    steps = steps or (QUICK_STEPS if quick else 30)
    methods = list(methods or (QUICK_METHODS if quick else METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not captions or not seeds or steps < 3:
        raise ValueError(f"bad bench arguments: unknown methods {unknown}, {len(captions)} captions, "
                         f"{len(seeds)} seeds, {steps} steps (methods: {', '.join(METHODS)})")
    graph_breaks = (not quick) if graph_breaks is None else graph_breaks
    if pipe is None:
        from ..reference.pipeline import ReferencePipeline

        pipe = ReferencePipeline.from_reference()
    pipe.set_progress_bar_config(disable=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    bench = Bench(pipe, steps, quick, progress)
    baseline = Setting("baseline", BASELINE, "-", lambda: lambda: float(steps))
    settings = [baseline] + [s for key in methods for s in settings_of(bench, key)]
    failed: dict[int, str] = {i: s.reason for i, s in enumerate(settings) if s.reason}
    held: dict[int, int] = {}

    def attempt(i: int, caption: str, seed: int, n: int | None = None, memory: list[int] | None = None):
        """Generate with setting ``i``: ``(video, seconds, computed)``; on an error mark it failed."""
        s = settings[i]
        calls_before = bench.calls
        try:
            with bench.probes() if s.probe else contextlib.nullcontext():
                finish = s.enable()
                try:
                    sampling = memory is not None and not s.compiled  # hooks around a compiled module: not here
                    with sample_held(bench, memory) if sampling else contextlib.nullcontext():
                        start = time.perf_counter()
                        video = bench.generate(caption, seed, n)
                        seconds = time.perf_counter() - start
                finally:
                    computed = finish()
        except Exception as error:  # a peer that cannot run on this model: its row says why
            failed[i] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            failed[i] += f" ({s.hint})" if s.hint else ""
            bench.pipe.transformer = bench.base
            progress(f"  {s.method} [{s.setting}] cannot run: {failed[i]}")
            return None
        if computed is None:  # counted by the probe; a compiled peer is not probed (``Setting.probe``)
            computed = (bench.calls - calls_before) / bench.calls_per_step if s.probe else math.nan
        return video, seconds, computed

    # uncached call count per step (CFG contexts), then one untimed run per setting: capture / compile,
    # calibrations, and the held-memory samples
    with bench.probes():
        bench.generate(captions[0], seeds[0])
    bench.calls_per_step = bench.calls / steps
    # compiled settings last: enabling the hooks of the peers once changes module attributes Dynamo guards on.
    # Every compiled peer setting recompiles the transformer's forward (other hooks): room for all of them.
    with _recompile_room(sum(s.compiled for s in settings)):
        breaks: dict[int, int] = {}  # graph breaks of each compiled setting, counted while it compiles
        for i in sorted(range(len(settings)), key=lambda i: settings[i].compiled):
            s = settings[i]
            if i in failed:
                continue
            progress(f"warm-up: {s.method} [{s.setting}]")
            memory: list[int] = []
            warm_steps = steps if s.compiled else min(3, steps)  # compiled graphs specialise on N
            before = sum(torch._dynamo.utils.counters["graph_break"].values())
            if attempt(i, CALIBRATION_CAPTIONS[0], 0, warm_steps, memory) is not None and memory:
                held[i] = max(memory)
            if s.compiled:
                breaks[i] = int(sum(torch._dynamo.utils.counters["graph_break"].values()) - before)

        results: dict[int, list[tuple]] = {i: [] for i in range(len(settings))}
        items = [(c, s) for s in seeds for c in captions]
        recompiles = sum(torch._dynamo.utils.counters["recompiles"].values())
        for k, (caption, seed) in enumerate(items):
            progress(f"[{k + 1}/{len(items)}] seed {seed}: {caption}")
            order = list(range(len(settings)))
            order = order[k % len(order):] + order[: k % len(order)]
            for i in order:
                if i not in failed:
                    got = attempt(i, caption, seed)
                    if got is not None:
                        results[i].append(got)

    rows = _aggregate(settings, results, failed, held, items, steps)
    for i, count in breaks.items():
        rows[i].graph_breaks = None if i in failed else count
    recompiles = sum(torch._dynamo.utils.counters["recompiles"].values()) - recompiles
    for row, s in zip(rows, settings):
        if s.compiled and recompiles:  # a recompilation inside a timed run would distort its time
            _append_note(row, f"{recompiles} recompilation(s) during timed runs")
    if graph_breaks:
        add_graph_breaks(bench, settings, failed, rows)
    bench.pipe.transformer = bench.base
    write_outputs(rows, out, captions, seeds, steps, description)
    return rows


def _append_note(row: Row, text: str) -> None:
    row.note = f"{row.note}; {text}" if row.note else text


@contextlib.contextmanager
def _recompile_room(compiled_settings: int):
    """Raise Dynamo's recompile limits while the settings run (every compiled peer recompiles the
    transformer's forward under its own hooks) and make hitting them an error (the row then says so)
    instead of a silent fall-back to eager; restore them after, also on an error."""
    config = torch._dynamo.config
    limits = config.recompile_limit, config.accumulated_recompile_limit, config.fail_on_recompile_limit_hit
    try:
        config.recompile_limit = max(limits[0], 8 * compiled_settings)
        config.accumulated_recompile_limit = max(limits[1], 64 * compiled_settings)
        config.fail_on_recompile_limit_hit = True  # a row silently falling back to eager would be mistimed
        yield
    finally:
        config.recompile_limit, config.accumulated_recompile_limit, config.fail_on_recompile_limit_hit = limits


def _aggregate(settings, results, failed, held, items, steps) -> list[Row]:
    from ..reference import check_clip, parse_caption

    base = results[0]
    compiled_base = next((results[i] for i, s in enumerate(settings)
                          if s.method == COMPILED_BASELINE and i not in failed and len(results[i]) == len(items)), None)
    rows = []
    for i, s in enumerate(settings):
        row = Row(s.method, s.setting, steps, note=s.note, compiled=s.compiled)
        if i in failed or len(results[i]) != len(items):
            row.note = failed.get(i, "did not run on every caption")  # replaces the caveat
            rows.append(row)
            continue
        videos, seconds, computed = zip(*results[i])
        checks = [check_clip(v.permute(1, 0, 2, 3) * 2 - 1, parse_caption(c)).ok for v, (c, _) in zip(videos, items)]
        row.computed = None if any(math.isnan(c) for c in computed) else float(np.mean(computed))
        timing_base = compiled_base if s.compiled and compiled_base is not None else base
        if s.compiled and compiled_base is None:
            _append_note(row, f"speedup vs eager: no '{COMPILED_BASELINE}' row ran")
        row.speedup = float(np.median([b[1] / t for b, t in zip(timing_base, seconds)]))
        if s.method == COMPILED_BASELINE:
            eager = float(np.median([b[1] / t for b, t in zip(base, seconds)]))
            _append_note(row, f"{eager:.2f}x the speed of the uncached eager model")
        row.time_s = float(np.median(seconds))
        row.psnr = psnr(torch.stack(videos), torch.stack([b[0] for b in base]))  # pooled MSE
        row.ssim = float(np.mean([ssim(v, b[0]) for v, b in zip(videos, base)]))
        row.check_ok = float(np.mean(checks))
        if i in held:  # minus what the uncached run holds
            row.cache_mib = max(0, held[i] - held.get(0, 0)) / 2**20
        rows.append(row)
    return rows
