"""``adacache-fx bench``: adacache-fx against published caching methods on the reference model.

Every method runs on the same ``WanTransformer3DModel`` inside the same ``ReferencePipeline`` (CFG as two
calls, ``cache_context("cond" / "uncond")``), on fixed captions and seeds; every metric is relative to the
uncached video of the same caption and seed, generated in the same process:

* ``computed``: transformer steps that ran the block stack, per generation and CFG context (mean). adacache-fx:
  ``adacache_fx.report``. Peers: executions of the self-attention of the middle block (a forward hook on
  ``blocks[mid].attn1.to_q``, which only runs when the block really computes) times N over the uncached
  count; for PAB, which skips attention only, it counts computed attentions (the FFNs always run).
* ``speedup``: median over (caption, seed) of uncached time / method time; the settings run round-robin per
  caption (rotated order), so drift of the machine affects them alike. ``time_s``: median seconds per video.
* ``psnr``: PSNR of the mean squared error over all videos of the row (``inf`` only when every video is
  identical to its uncached one; a mean of per-video PSNRs would be infinite as soon as one is).
  ``ssim``: mean over videos. ``check_ok``: fraction of videos passing ``adacache_fx.tools.reference.check_clip``.
* ``cache_mib``: the largest amount of tensor memory the method holds between transformer calls (tensors
  reachable from the pipeline that are neither parameters nor buffers and were not there uncached),
  sampled before and after every transformer call of the untimed warm-up generation (3 steps; not for the
  compiled rows). CPU has no allocator statistics: this is the cache's footprint, not the process peak.
* ``graph_breaks``: ``torch._dynamo`` graph breaks when the transformer, with the method enabled, is
  compiled (``backend="eager"``) and runs a 3-step generation; adacache-fx's compiled rows use
  ``fullgraph=True`` (which fails on any break).

Methods that cannot run on this model get a row whose ``note`` says why.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import statistics
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch._dynamo
from torch import nn

from . import presets
from .api import report, transform
from .calibrate import fit_codebook, max_speedup, record_metrics
from .config import AdaCacheConfig, MoRegConfig
from .metrics import psnr, ssim


def _eval_captions(n: int = 24) -> tuple[str, ...]:
    """``n`` captions (n a multiple of 24 keeps every marginal exact): speeds cycle still/slow/fast, each
    direction gets as many slow as fast captions, shapes cycle, colours and sizes are a fixed shuffle."""
    from .reference.data import COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS, Caption

    rng = np.random.default_rng(0)
    colours = rng.permutation(np.repeat(list(COLOURS), -(-n // len(COLOURS))))[:n]
    sizes = rng.permutation(np.repeat(list(SIZES), -(-n // len(SIZES))))[:n]
    captions, moving = [], 0
    for i in range(n):
        speed = SPEEDS[i % 3]
        direction = None
        if speed != "still":
            direction, moving = DIRECTIONS[(moving // 2) % len(DIRECTIONS)], moving + 1
        shape = SHAPES[(i + i // 3) % len(SHAPES)]
        captions.append(Caption(shape, str(colours[i]), str(sizes[i]), direction, speed).text)
    return tuple(captions)


#: Evaluation captions: 8 still, 8 slow, 8 fast; 4 per direction; 8 per shape; 4 per colour; 12 per size.
EVAL_CAPTIONS = _eval_captions()
#: Held-out captions for the calibrations (adacache-fx codebooks, MagCache ratios): none is evaluated.
CALIBRATION_CAPTIONS = (
    "a large yellow circle staying still",
    "a small green triangle staying still",
    "a small yellow square moving up slow",
    "a large white triangle moving down slow",
    "a large red square moving left fast",
    "a small blue circle moving up fast",
)
#: ``--quick``: one still and one fast caption, 10 steps, one seed, one setting per method.
QUICK_CAPTIONS = (EVAL_CAPTIONS[0], EVAL_CAPTIONS[2])
QUICK_STEPS = 10
#: Plotted PSNR ceiling (identical videos are drawn here).
PLOT_CAP = 60.0

#: Method key -> (curve name, settings of the full run, settings of --quick).
METHODS: dict[str, tuple[str, tuple, tuple]] = {
    "adacache-never": ("adacache-fx never", (), ("never",)),
    "adacache-fast": ("adacache-fx fast", (0.5, 1.0, 2.0), (1.0,)),
    "adacache-fast-moreg": ("adacache-fx fast+MoReg", (1.0,), (1.0,)),
    "adacache-slow": ("adacache-fx slow", (0.5, 1.0), (1.0,)),
    "adacache-slow-moreg": ("adacache-fx slow+MoReg", (1.0,), (1.0,)),
    "adacache-static": ("adacache-fx static", (2, 3), (2,)),
    "adacache-calibrated": ("adacache-fx calibrated", ("slow", "fast", 2.5, 3.0), (1.5,)),
    "adacache-calibrated-warm": ("adacache-fx calibrated+warm-up+linear", (2.0, 2.25, 2.5), (1.5,)),
    "adacache-compiled": ("adacache-fx compiled", ("none", "fast"), ("none", "fast")),
    "fbcache": ("diffusers FirstBlockCache", (0.05, 0.1, 0.2, 0.3), (0.1,)),
    "pab": ("diffusers PAB", (2,), (2,)),
    "taylorseer": ("diffusers TaylorSeer", (2, 4), (3,)),
    "magcache": ("diffusers MagCache", (0.06, 0.2), (0.1,)),
    "fastercache": ("diffusers FasterCache", ("default",), ("default",)),
    "dbcache": ("cache-dit DBCache", (0.1, 0.2), (0.1,)),
    "dbcache-taylorseer": ("cache-dit DBCache+TaylorSeer", (0.1, 0.2), (0.2,)),
}
#: Each adacache-fx setting costs one ``torch.export`` capture (seconds): --quick keeps four.
QUICK_METHODS = ("adacache-never", "adacache-fast", "adacache-static", "adacache-calibrated-warm", "fbcache",
                 "taylorseer", "fastercache", "dbcache")
BASELINE = "no caching"
ADACACHE_TARGET_CURVES = ("adacache-fx fast", "adacache-fx fast+MoReg", "adacache-fx calibrated",
                          "adacache-fx calibrated+warm-up+linear")
#: ``adacache-calibrated-warm``: warm-up steps (a sixth of N), top rate, linear residual extrapolation.
WARM_FRACTION, WARM_MAX_RATE = 1 / 6, 4


@dataclass
class Row:
    """One table row: a method at one setting, aggregated over captions and seeds (see the module doc)."""

    method: str
    setting: str
    steps: int
    computed: float | None = None
    speedup: float | None = None
    time_s: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    check_ok: float | None = None
    cache_mib: float | None = None
    graph_breaks: int | None = None
    note: str = ""


COLUMNS = tuple(f.name for f in fields(Row))


@dataclass
class _Setting:
    """How to switch one method setting on: ``enable()`` returns ``finish()``, which switches it off and
    returns the computed steps per context (``None``: count the middle block)."""

    key: str
    method: str
    setting: str
    enable: Callable[[], Callable[[], float | None]] | None
    reason: str = ""  # set when the method cannot run at all
    hint: str = ""  # appended to an error raised while it runs
    note: str = ""  # a caveat shown in the row
    compiled: bool = False
    probe: bool = True  # count block executions with hooks (not for adacache-fx: its graph calls no module)


class _Bench:
    """The pipeline, its uncached transformer, and the probes the peers are measured with."""

    def __init__(self, pipe, steps: int, quick: bool, progress: Callable[[str], None]):
        self.pipe, self.steps, self.quick, self.progress = pipe, steps, quick, progress
        self.base = pipe.transformer
        self.calls = 0
        self.calls_per_step = 2.0  # replaced by the uncached count
        self._cal: dict[str, object] = {}
        self._held_at_start = _held_storages(pipe)

    def generate(self, caption: str, seed: int, steps: int | None = None) -> torch.Tensor:
        """One video ``[T, C, H, W]`` in [0, 1]."""
        generator = torch.Generator().manual_seed(seed)
        return self.pipe(caption, num_inference_steps=steps or self.steps, generator=generator).frames[0]

    @contextlib.contextmanager
    def probes(self):
        """Count middle-block attention executions."""
        mid = self.base.blocks[len(self.base.blocks) // 2]

        def count(*_):
            self.calls += 1

        handle = mid.attn1.to_q.register_forward_hook(count)
        try:
            yield
        finally:
            handle.remove()

    def held_bytes(self) -> int:
        """Bytes of tensors reachable from the pipeline now that were not there uncached (see module doc)."""
        return sum(n for ptr, n in _held_storages(self.pipe).items() if ptr not in self._held_at_start)

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


# -- method settings ----------------------------------------------------------------------------------
def _adacache(bench: _Bench, key: str, method: str, setting: str, config, compiled=False) -> _Setting:
    holder: dict[str, nn.Module] = {}

    def enable():
        if "model" not in holder:
            cfg = config() if callable(config) else config
            model = bench.base if cfg is None else transform(bench.base, cfg)
            holder["model"] = torch.compile(model, fullgraph=True) if compiled else model
        model = holder["model"]
        bench.pipe.transformer = model

        def finish():
            bench.pipe.transformer = bench.base
            if model is bench.base or getattr(model, "_orig_mod", None) is bench.base:
                return float(bench.steps)  # uncached (compiled): every step computes
            counts = []
            for context in ("cond", "uncond", "default"):
                with contextlib.suppress(RuntimeError):
                    counts.append(report(model, context).num_computed)
            return float(statistics.mean(counts))

        return finish

    return _Setting(key, method, setting, enable, compiled=compiled, probe=False)


def _diffusers_hook(bench: _Bench, key, method, setting, make_config, hint="", note="") -> _Setting:
    def enable():
        try:
            bench.base.enable_cache(make_config())
        except Exception:
            with contextlib.suppress(Exception):
                bench.base.disable_cache()
            raise

        def finish():
            bench.pipe.maybe_free_model_hooks()  # resets the hooks' state, as diffusers pipelines do per call
            bench.base.disable_cache()

        return finish

    return _Setting(key, method, setting, enable, hint=hint, note=note)


def _cache_dit(bench: _Bench, key, method, setting, threshold: float, taylorseer: bool) -> _Setting:
    try:
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "ERROR")
        import cache_dit

        logging.getLogger("CACHE_DIT").setLevel(logging.ERROR)  # its root logger
    except ImportError as error:
        return _Setting(key, method, setting, None, reason=f"cache-dit is not installed ({error})")

    def enable():
        adapter = cache_dit.BlockAdapter(
            pipe=bench.pipe, transformer=bench.base, blocks=bench.base.blocks,
            forward_pattern=cache_dit.ForwardPattern.Pattern_2, has_separate_cfg=True,
        )
        warmup = 8 if bench.steps >= 24 else max(1, bench.steps // 4)  # cache-dit's default 8 is for ~28 steps
        cache_dit.enable_cache(
            adapter,
            cache_config=cache_dit.DBCacheConfig(
                Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                max_warmup_steps=warmup, num_inference_steps=bench.steps,
            ),
            calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None,
        )
        return lambda: cache_dit.disable_cache(bench.pipe)

    return _Setting(key, method, setting, enable)


def _settings(bench: _Bench, key: str) -> list[_Setting]:
    """The settings of method ``key`` (full or quick grid)."""
    method, full, quick = METHODS[key]
    values = quick if bench.quick else full
    n = bench.steps
    out = []
    for v in values:
        if key == "adacache-never":
            out.append(_adacache(bench, key, method, "never skips (exact)",
                                 AdaCacheConfig(num_steps=n, codebook=presets.NEVER)))
        elif key.startswith(("adacache-fast", "adacache-slow")):
            base = presets.FAST_30 if "fast" in key else presets.SLOW_30
            codebook = {t * v: r for t, r in base.items()}
            moreg = MoRegConfig(window=_moreg_window(n)) if key.endswith("moreg") else None
            out.append(_adacache(bench, key, method, f"thresholds x{v:g}",
                                 AdaCacheConfig(num_steps=n, codebook=codebook, moreg=moreg)))
        elif key == "adacache-static":
            out.append(_adacache(bench, key, method, f"every {v} steps",
                                 AdaCacheConfig(num_steps=n, compute_steps=static_schedule(n, v))))
        elif key == "adacache-calibrated":
            if not isinstance(v, str) and v > max_speedup(n):
                continue
            label = f"target {v}" if isinstance(v, str) else f"target {v:g}x steps"
            out.append(_adacache(bench, key, method, label,
                                 lambda v=v: AdaCacheConfig(num_steps=n, codebook=fit_codebook(bench.trajectories(), n, v))))
        elif key == "adacache-calibrated-warm":
            warmup = round(n * WARM_FRACTION)
            if v > max_speedup(n, warmup, WARM_MAX_RATE):
                continue
            out.append(_adacache(
                bench, key, method, f"target {v:g}x steps, warm-up {warmup}, rate <= {WARM_MAX_RATE}",
                lambda v=v, warmup=warmup: AdaCacheConfig(
                    num_steps=n, warmup_steps=warmup, extrapolation_order=1,
                    codebook=fit_codebook(bench.trajectories(), n, v, warmup, WARM_MAX_RATE))))
        elif key == "adacache-compiled":  # with the uncached model compiled alike, for reference
            if v == "none":
                out.append(_adacache(bench, key, f"{BASELINE} compiled", "inductor", None, compiled=True))
            else:
                config = AdaCacheConfig(num_steps=n, codebook=presets.FAST_30)
                out.append(_adacache(bench, key, method, "fast thresholds x1, inductor fullgraph", config, compiled=True))
        elif key == "fbcache":
            from diffusers.hooks import FirstBlockCacheConfig

            out.append(_diffusers_hook(bench, key, method, f"threshold {v:g}", lambda v=v: FirstBlockCacheConfig(threshold=v)))
        elif key == "pab":
            from diffusers.hooks import PyramidAttentionBroadcastConfig

            out.append(_diffusers_hook(
                bench, key, method, f"self-attn every {v}, cross-attn every {2 * v}",
                lambda v=v: PyramidAttentionBroadcastConfig(
                    spatial_attention_block_skip_range=v, cross_attention_block_skip_range=2 * v,
                    current_timestep_callback=lambda: bench.pipe.current_timestep),
                note="attention only (FFNs always run); one state per attention for both CFG calls, so inside "
                     "its timestep range the uncond call reuses the cond call's attention of the same step"))
        elif key == "taylorseer":
            from diffusers.hooks import TaylorSeerCacheConfig

            # The default identifiers ("^blocks.*attn", fullmatch) match no Wan module (attn1/attn2): name the blocks.
            out.append(_diffusers_hook(
                bench, key, method, f"interval {v}, order 1, blocks",
                lambda v=v: TaylorSeerCacheConfig(cache_interval=v, max_order=1, taylor_factors_dtype=torch.float32,
                                                  cache_identifiers=[r"blocks\.\d+"]),
                note="block outputs predicted (its default identifiers match no Wan module: a no-op)"))
        elif key == "magcache":
            from diffusers.hooks import MagCacheConfig

            out.append(_diffusers_hook(
                bench, key, method, f"threshold {v:g}, K 3, own calibration",
                lambda v=v: MagCacheConfig(threshold=v, max_skip_steps=3, num_inference_steps=n,
                                           mag_ratios=bench.mag_ratios()),
                note="ratios from its own calibration mode, on the held-out captions"))
        elif key == "fastercache":
            from diffusers.hooks import FasterCacheConfig

            out.append(_diffusers_hook(
                bench, key, method, "diffusers' example settings",
                lambda: FasterCacheConfig(spatial_attention_block_skip_range=2,
                                          current_timestep_callback=lambda: bench.pipe.current_timestep,
                                          attention_weight_callback=lambda _: 0.3, tensor_format="BCFHW"),
                hint="FasterCache derives the unconditional output from a batch holding [uncond, cond] in one "
                     "call; ReferencePipeline (like diffusers' WanPipeline) runs CFG as two batch-1 calls"))
        elif key in ("dbcache", "dbcache-taylorseer"):
            label = f"F1B0, threshold {v:g}" + (", TaylorSeer order 1" if key.endswith("taylorseer") else "")
            out.append(_cache_dit(bench, key, method, label, v, key.endswith("taylorseer")))
    return out


def static_schedule(num_steps: int, every: int) -> tuple[int, ...]:
    """Compute steps of the static schedule: every ``every`` steps from step 1, plus steps N-1 and N."""
    return tuple(sorted(set(range(1, num_steps + 1, every)) | {num_steps - 1, num_steps}))


def _moreg_window(num_steps: int) -> tuple[int, int]:
    first, last = presets.MOREG_WINDOW_30
    return max(1, round(first * num_steps / 30)), max(1, round(last * num_steps / 30))


# -- held memory ---------------------------------------------------------------------------------------
_LEAVES = (str, bytes, int, float, bool, complex, type(None), type, types.ModuleType, types.FunctionType,
           types.BuiltinFunctionType, types.MethodType, torch.dtype, torch.device)


def _held_storages(root, max_objects: int = 200_000) -> dict[int, int]:
    """``{storage pointer: bytes}`` of the tensors reachable from ``root`` through containers and object
    attributes, skipping module parameters and buffers and fx graphs (their metadata holds fake tensors)."""
    seen, found, stack = set(), {}, [root]
    while stack and len(seen) < max_objects:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if not isinstance(obj, nn.Parameter):
                with contextlib.suppress(Exception):
                    storage = obj.untyped_storage()
                    found[storage.data_ptr()] = storage.nbytes()
            continue
        if isinstance(obj, (torch.fx.Graph, torch.fx.Node)):
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, nn.Module):
            stack.extend(v for k, v in vars(obj).items() if k not in ("_parameters", "_buffers"))
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    found.pop(0, None)
    return found


@contextlib.contextmanager
def _sample_held(bench: _Bench, out: list[int]):
    """Sample :meth:`_Bench.held_bytes` before and after every call of the pipeline's transformer."""
    model = bench.pipe.transformer
    sample = lambda *_a, **_k: out.append(bench.held_bytes())  # noqa: E731
    handles = [model.register_forward_pre_hook(sample), model.register_forward_hook(sample)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# -- graph breaks --------------------------------------------------------------------------------------
def count_graph_breaks(bench: _Bench, setting: _Setting) -> tuple[int, int]:
    """``(graph breaks, recompilations)`` of the transformer with ``setting`` enabled, compiled with
    ``backend="eager"``, over a 3-step generation (Dynamo's counters)."""
    import torch._dynamo

    finish = setting.enable()
    model = bench.pipe.transformer
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        bench.pipe.transformer = torch.compile(model, backend="eager")
        bench.generate(CALIBRATION_CAPTIONS[0], 0, steps=3)
    finally:
        bench.pipe.transformer = model
        finish()
        counters = torch._dynamo.utils.counters
        counts = int(sum(counters["graph_break"].values())), int(sum(counters["recompiles"].values()))
        torch._dynamo.reset()
    return counts


# -- the run -------------------------------------------------------------------------------------------
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
        from .reference.pipeline import ReferencePipeline

        pipe = ReferencePipeline.from_reference()
    pipe.set_progress_bar_config(disable=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    bench = _Bench(pipe, steps, quick, progress)
    baseline = _Setting("baseline", BASELINE, "-", lambda: lambda: float(steps))
    settings = [baseline] + [s for key in methods for s in _settings(bench, key)]
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
                    with _sample_held(bench, memory) if sampling else contextlib.nullcontext():
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
        if computed is None:
            computed = (bench.calls - calls_before) / bench.calls_per_step
        return video, seconds, computed

    # uncached call count per step (CFG contexts), then one untimed run per setting: capture / compile,
    # calibrations, and the held-memory samples
    with bench.probes():
        bench.generate(captions[0], seeds[0])
    bench.calls_per_step = bench.calls / steps
    # compiled settings last: enabling the hooks of the peers once changes module attributes Dynamo guards on
    for i in sorted(range(len(settings)), key=lambda i: settings[i].compiled):
        s = settings[i]
        if i in failed:
            continue
        progress(f"warm-up: {s.method} [{s.setting}]")
        memory: list[int] = []
        warm_steps = steps if s.compiled else min(3, steps)  # compiled graphs specialise on N
        if attempt(i, CALIBRATION_CAPTIONS[0], 0, warm_steps, memory) is not None and memory:
            held[i] = max(memory)

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
    recompiles = sum(torch._dynamo.utils.counters["recompiles"].values()) - recompiles
    for row, s in zip(rows, settings):
        if s.compiled and recompiles:  # a recompilation inside a timed run would distort its time
            row.note = (row.note + "; " if row.note else "") + f"{recompiles} recompilation(s) during timed runs"
    if graph_breaks:
        _add_graph_breaks(bench, settings, failed, rows)
    bench.pipe.transformer = bench.base
    write_outputs(rows, out, captions, seeds, steps, description)
    return rows


def _aggregate(settings, results, failed, held, items, steps) -> list[Row]:
    from .reference import check_clip, parse_caption

    base = results[0]
    rows = []
    for i, s in enumerate(settings):
        row = Row(s.method, s.setting, steps, note=s.note)
        if i in failed or len(results[i]) != len(items):
            row.note = failed.get(i, "did not run on every caption")  # replaces the caveat
            rows.append(row)
            continue
        videos, seconds, computed = zip(*results[i])
        checks = [check_clip(v.permute(1, 0, 2, 3) * 2 - 1, parse_caption(c)).ok for v, (c, _) in zip(videos, items)]
        row.computed = float(np.mean(computed))
        row.speedup = float(np.median([b[1] / t for b, t in zip(base, seconds)]))
        row.time_s = float(np.median(seconds))
        row.psnr = psnr(torch.stack(videos), torch.stack([b[0] for b in base]))  # pooled MSE
        row.ssim = float(np.mean([ssim(v, b[0]) for v, b in zip(videos, base)]))
        row.check_ok = float(np.mean(checks))
        if i in held:  # minus what the uncached run holds
            row.cache_mib = max(0, held[i] - held.get(0, 0)) / 2**20
        rows.append(row)
    return rows


def _add_graph_breaks(bench: _Bench, settings, failed, rows) -> None:
    """One count per method (its first setting that ran); every row of the method gets it."""
    counted: dict[str, tuple[int, int] | str] = {}
    for i, s in enumerate(settings):
        if s.compiled:
            rows[i].graph_breaks = None if i in failed else 0  # ran with fullgraph=True
            continue
        if i in failed or s.method in counted:
            continue
        bench.progress(f"graph breaks: {s.method}")
        try:
            counted[s.method] = count_graph_breaks(bench, s)
        except Exception as error:
            counted[s.method] = f"compile failed: {type(error).__name__}"
    for i, s in enumerate(settings):
        value = counted.get(s.method)
        if isinstance(value, tuple):
            rows[i].graph_breaks = value[0]
            value = f"{value[1]} recompilations in 3 compiled steps" if value[1] else None
        if value:
            rows[i].note = (rows[i].note + "; " if rows[i].note else "") + value


# -- outputs -------------------------------------------------------------------------------------------
def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| method | setting | computed / N | speedup | s / video | PSNR dB | SSIM | caption ok | cache MiB | "
             "graph breaks | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        computed = "-" if r.computed is None else f"{r.computed:.1f}/{r.steps}"
        speedup = "-" if r.speedup is None else f"{r.speedup:.2f}x"
        lines.append(
            f"| {r.method} | {r.setting} | {computed} | {speedup} | {_fmt(r.time_s)} | {_fmt(r.psnr)} | "
            f"{_fmt(r.ssim, 4)} | {_fmt(r.check_ok)} | {_fmt(r.cache_mib, 3)} | {_fmt(r.graph_breaks)} | {r.note} |"
        )
    return "\n".join(lines)


def best_curve(rows: Sequence[Row]) -> list[Row]:
    """The Pareto front of eager adacache-fx rows (speedup up, PSNR down): no other row is faster and better."""
    front: list[Row] = []
    ada = [r for r in rows if r.method.startswith("adacache-fx") and r.method != "adacache-fx compiled"
           and r.speedup is not None and r.psnr is not None]
    for r in sorted(ada, key=lambda r: (-r.speedup, -r.psnr)):  # fastest first
        if not front or r.psnr > front[-1].psnr:
            front.append(r)
    return front[::-1]


def _curve_at(front: list[Row], speedup: float) -> tuple[float, str] | None:
    """PSNR of the best curve at ``speedup`` (linear between its points; below its slowest point, that point's
    PSNR), and the points it comes from; ``None`` beyond its fastest point."""
    if not front or speedup > front[-1].speedup:
        return None
    if speedup <= front[0].speedup:
        a = front[0]
        return a.psnr, f"{a.method} [{a.setting}] {a.speedup:.2f}x"
    for a, b in zip(front, front[1:]):
        if a.speedup <= speedup <= b.speedup:
            w = (speedup - a.speedup) / (b.speedup - a.speedup)
            value = min(a.psnr, b.psnr) if math.isinf(a.psnr) else a.psnr + w * (b.psnr - a.psnr)
            return value, f"between {a.method} [{a.setting}] {a.speedup:.2f}x and {b.method} [{b.setting}] {b.speedup:.2f}x"
    return None


def summarize_targets(rows: Sequence[Row]) -> str:
    """The AdaCache targets: >= 2x wall-clock at >= 25 dB, and, at every speedup a peer reaches, the PSNR of
    adacache-fx's best curve (:func:`best_curve`, interpolated) against the peer's."""
    ran = [r for r in rows if r.speedup is not None and r.psnr is not None and not r.method.startswith(BASELINE)]
    lines = []
    hits = [r for r in ran if r.method in ADACACHE_TARGET_CURVES and r.speedup >= 2 and r.psnr >= 25]
    if hits:
        best = max(hits, key=lambda r: (r.psnr, r.speedup))
        lines.append(f"- >= 2x at >= 25 dB: **met** by {len(hits)} setting(s); best PSNR: {best.method} "
                     f"[{best.setting}] {best.speedup:.2f}x, {_fmt(best.psnr)} dB.")
    else:
        cand = [r for r in ran if r.method in ADACACHE_TARGET_CURVES]
        fastest_ok = max((r for r in cand if r.psnr >= 25), key=lambda r: r.speedup, default=None)
        best_2x = max((r for r in cand if r.speedup >= 2), key=lambda r: r.psnr, default=None)
        lines.append("- >= 2x at >= 25 dB: **not met**; fastest at >= 25 dB: "
                     + (f"{fastest_ok.method} [{fastest_ok.setting}] {fastest_ok.speedup:.2f}x" if fastest_ok else "none")
                     + "; best PSNR at >= 2x: "
                     + (f"{best_2x.method} [{best_2x.setting}] {_fmt(best_2x.psnr)} dB" if best_2x else "none") + ".")
    front = best_curve(ran)
    for r in ran:
        if r.method.startswith("adacache-fx"):
            continue
        head = f"- {r.method} [{r.setting}] {r.speedup:.2f}x / {_fmt(r.psnr)} dB: "
        at = _curve_at(front, r.speedup)
        if at is None:
            top = max((a.speedup for a in front), default=float("nan"))
            lines.append(head + f"adacache-fx reaches no such speedup (its fastest: {top:.2f}x).")
            continue
        value, where = at
        if value >= r.psnr:
            verdict = "equal or higher"
        elif math.isinf(r.psnr):
            verdict = "**lower** (the peer's videos are identical to the uncached ones)"
        else:
            verdict = f"**lower by {r.psnr - value:.2f} dB**"
        lines.append(head + f"adacache-fx's best curve there: {_fmt(value)} dB ({where}): {verdict}.")
    return "\n".join(lines)


def load_rows(path: Path | str) -> list[Row]:
    """Rows back from a ``bench.csv`` (to re-render the table, the targets or the plot)."""
    types_ = {f.name: f.type for f in fields(Row)}
    rows = []
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            values = {}
            for k, v in record.items():
                if k in ("method", "setting", "note"):
                    values[k] = v
                elif v == "":
                    values[k] = None
                else:
                    values[k] = int(float(v)) if "int" in str(types_[k]) and "float" not in str(types_[k]) else float(v)
            rows.append(Row(**values))
    return rows


def plot_pareto(rows: Sequence[Row], path: Path) -> None:
    """Speedup vs PSNR, one curve per method (identical videos drawn at ``PLOT_CAP`` dB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    methods = list(dict.fromkeys(r.method for r in rows))
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(methods), 2)))
    for method, colour in zip(methods, colours):
        points = sorted((r.speedup, min(r.psnr, PLOT_CAP)) for r in rows
                        if r.method == method and r.speedup is not None and r.psnr is not None)
        if points:
            style = "o-" if method.startswith("adacache-fx") else "s--"
            ax.plot(*zip(*points), style, label=method, ms=5, color=colour)
    ax.axhline(25, color="gray", lw=0.8, ls=":")
    ax.axvline(2, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("wall-clock speedup vs no caching (median)")
    ax.set_ylabel(f"PSNR vs uncached video, dB (identical drawn at {PLOT_CAP:g})")
    ax.set_title("Caching methods on the reference Wan model")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_LEGEND = """Columns: *computed* = transformer steps that ran the block stack per video and CFG context (adacache-fx:
its report; peers: executions of the middle block's self-attention, for PAB computed attentions); *speedup* =
median over videos of uncached / method wall-clock time, all settings run round-robin per video in one process;
*PSNR* = of the mean squared error over all videos against the uncached videos (same caption and seed); *SSIM*
= mean; *caption ok* = fraction passing `check_clip`; *cache MiB* = the largest tensor memory the method holds
between transformer calls (CPU: no allocator peak; `-` = not sampled); *graph breaks* = Dynamo graph breaks
compiling the transformer with the method enabled (3 steps)."""


def write_outputs(rows: Sequence[Row], out: Path, captions, seeds, steps, description: str = "") -> None:
    """``bench.csv`` (one line per row, :data:`COLUMNS`), ``bench.md`` (table and targets), ``pareto.png``."""
    out = Path(out)
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(r).items()})
    header = (f"# adacache-fx bench\n\nReference model{f' ({description})' if description else ''}, {steps} "
              f"steps, CFG 3.0, {len(captions)} captions x {len(seeds)} seed(s), torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s).\n\n{_LEGEND}\n\n")
    (out / "bench.md").write_text(header + format_table(rows) + "\n\n## Targets\n\n" + summarize_targets(rows) + "\n")
    plot_pareto(rows, out / "pareto.png")


# -- command line --------------------------------------------------------------------------------------
def add_bench_arguments(parser) -> None:
    """Arguments of ``adacache-fx bench``."""
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 captions, 10 steps, few settings")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 30; quick 10)")
    parser.add_argument("--captions", type=int, default=None, help="use the first N evaluation captions")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None, metavar="METHOD",
                        help="methods to compare (default: all; quick: a few); one of: " + ", ".join(sorted(METHODS)))
    parser.add_argument("--no-graph-breaks", action="store_true", help="skip the graph-break counts")
    parser.add_argument("--untrained", action="store_true", help="a freshly initialised model (no weights needed)")
    parser.add_argument("--weights", default=None, help="folder of the reference weights (default: bundled)")
    parser.add_argument("--out", default="adacache-fx-bench", help="results folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def cli_bench(args) -> int:
    """``adacache-fx bench``: run :func:`run_bench` and print the Markdown table."""
    from .reference.pipeline import ReferencePipeline

    torch.set_num_threads(args.threads)
    if args.untrained:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from .reference import build_reference_model

        torch.manual_seed(0)
        transformer, encoder = build_reference_model()
        pipe = ReferencePipeline(transformer.eval(), encoder.eval(), FlowMatchEulerDiscreteScheduler(shift=1.0))
        description = "untrained weights, seed 0"
    else:
        pipe = ReferencePipeline.from_reference(args.weights)
        description = f"weights {args.weights or 'bundled'}"
    captions = None
    if args.captions is not None:
        captions = list(EVAL_CAPTIONS[: args.captions]) if args.captions <= len(EVAL_CAPTIONS) else list(
            _eval_captions(args.captions))
    rows = run_bench(captions, args.seeds, args.steps, args.methods, quick=args.quick, out=Path(args.out), pipe=pipe,
                     graph_breaks=False if args.no_graph_breaks else None, description=description)
    print(format_table(rows))
    print("\n" + summarize_targets(rows))
    print(f"\nwrote bench.csv, bench.md and pareto.png to {Path(args.out).resolve()}")
    return 0
