"""``adacache-fx bench``: its arguments and the command."""

from __future__ import annotations

from pathlib import Path

import torch

from ..fixtures import untrained_reference_pipeline
from .captions import EVAL_CAPTIONS, eval_captions
from .harness import run_bench
from .registry import METHODS
from .report import format_table, summarize_targets


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
    from ..reference.pipeline import ReferencePipeline

    torch.set_num_threads(args.threads)
    if args.untrained:
        pipe = untrained_reference_pipeline(0)
        description = "untrained weights, seed 0"
    else:
        pipe = ReferencePipeline.from_reference(args.weights)
        from ..reference import weights_label

        description = f"weights {weights_label(args.weights, pipe.transformer)}"
    captions = None
    if args.captions is not None:
        captions = list(EVAL_CAPTIONS[: args.captions]) if args.captions <= len(EVAL_CAPTIONS) else list(
            eval_captions(args.captions))
    rows = run_bench(captions, args.seeds, args.steps, args.methods, quick=args.quick, out=Path(args.out), pipe=pipe,
                     graph_breaks=False if args.no_graph_breaks else None, description=description)
    print(format_table(rows))
    print("\n" + summarize_targets(rows))
    print(f"\nwrote bench.csv, bench.md and pareto.png to {Path(args.out).resolve()}")
    return 0
