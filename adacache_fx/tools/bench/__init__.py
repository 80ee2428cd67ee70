"""``adacache-fx bench``: adacache-fx against published caching methods on the reference model.

Every method runs on the same ``WanTransformer3DModel`` inside the same ``ReferencePipeline`` (CFG as two
calls, ``cache_context("cond" / "uncond")``), on fixed captions and seeds; every metric is relative to the
uncached video of the same caption and seed, generated in the same process:

* ``computed``: transformer steps that ran the block stack, per generation and CFG context (mean). adacache-fx:
  ``adacache_fx.report``. Peers: executions of the self-attention of the middle block (a forward hook on
  the first ``to_q`` of the middle block of the first block list, which only runs when the block really computes) times N over the uncached
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
  compiled (``backend="eager"``) and runs a 3-step generation; for the compiled rows, the breaks counted
  while the row's own Inductor compilation ran (its N-step warm-up; adacache-fx's use ``fullgraph=True``,
  which fails on any break).
* compiled rows (``*-compiled`` methods, ``Row.compiled``): the transformer under ``torch.compile``
  (Inductor); their ``speedup`` is against ``no caching compiled`` (the uncached transformer compiled the
  same way, measured in the same run); a compiled peer's ``computed`` is left empty (the probe hook is not
  used under compile: its eager row has the count). Dynamo's recompile limits are raised while the
  settings run, and hitting them fails the row instead of falling back to eager.

Methods that cannot run on this model get a row whose ``note`` says why.
"""

from . import adacache_methods, peer_methods  # noqa: F401  (register the methods, adacache-fx first)
from .adacache_methods import WARM_FRACTION, WARM_MAX_RATE, static_schedule, taylorseer_schedule
from .captions import CALIBRATION_CAPTIONS, EVAL_CAPTIONS, QUICK_CAPTIONS, QUICK_STEPS, eval_captions
from .cli import add_bench_arguments, cli_bench
from .graph_breaks import count_graph_breaks
from .harness import Bench, run_bench
from .registry import METHODS, QUICK_METHODS, Setting, register
from .report import (
    ADACACHE_TARGET_CURVES,
    PLOT_CAP,
    best_curve,
    format_table,
    load_rows,
    plot_pareto,
    summarize_targets,
    write_outputs,
)
from .rows import BASELINE, COLUMNS, Row

__all__ = [
    "ADACACHE_TARGET_CURVES",
    "BASELINE",
    "CALIBRATION_CAPTIONS",
    "COLUMNS",
    "EVAL_CAPTIONS",
    "METHODS",
    "PLOT_CAP",
    "QUICK_CAPTIONS",
    "QUICK_METHODS",
    "QUICK_STEPS",
    "WARM_FRACTION",
    "WARM_MAX_RATE",
    "Bench",
    "Row",
    "Setting",
    "add_bench_arguments",
    "best_curve",
    "cli_bench",
    "count_graph_breaks",
    "eval_captions",
    "format_table",
    "load_rows",
    "plot_pareto",
    "register",
    "run_bench",
    "static_schedule",
    "taylorseer_schedule",
    "summarize_targets",
    "write_outputs",
]
