"""``adacache-fx corpus``: its arguments and the command."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .configs import CONFIGS, DIFFUSERS_COMMIT, select
from .runner import NEVER_SKIP_CALLS, NUM_STEPS, TIMEOUT_S, Result, run_isolated
from .table import computed_label, diff_label, error_label, markdown, result_label, summary, to_csv


def add_corpus_arguments(parser) -> None:
    """Arguments of ``adacache-fx corpus``."""
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                        help="configurations whose name contains NAME, or whose class is NAME (case-insensitive)")
    parser.add_argument("--video", action="store_true", help="video classes only")
    parser.add_argument("--compile", nargs="?", const="aot_eager", default=None, metavar="BACKEND",
                        help="also torch.compile(fullgraph=True) the transformed model (backend aot_eager, "
                             "or the one given, e.g. inductor): graphs, graph breaks, outputs against eager")
    parser.add_argument("--onnx", action="store_true",
                        help="also export the default-policy transform with to_onnx and run it in OnnxRunner: "
                             "exported (and validated), the same computed steps, the outputs' max difference")
    parser.add_argument("--steps", type=int, default=NUM_STEPS, help=f"N of the default policy (default {NUM_STEPS})")
    parser.add_argument("--never-skip-calls", type=int, default=NEVER_SKIP_CALLS,
                        help=f"calls compared with the untransformed model (default {NEVER_SKIP_CALLS})")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S,
                        help=f"seconds per configuration (default {TIMEOUT_S:g})")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run at once, one process each (default 1)")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--out", default=None, metavar="DIR", help="write corpus.md and corpus.csv into DIR")


def core_fingerprint() -> str:
    """A hash of the adacache_fx core's sources (every ``.py`` outside ``tools/``): which core a table
    measured, committed or not."""
    import hashlib

    import adacache_fx

    root = Path(adacache_fx.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.py") if "tools" not in p.relative_to(root).parts):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _git_state() -> str:
    """The checkout the package comes from: commit, and the core files changed since it."""
    import adacache_fx

    root = Path(adacache_fx.__file__).resolve().parents[1]
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10).stdout.rstrip("\n")

        commit = git("rev-parse", "--short", "HEAD")
        changed = [line[3:] for line in git("status", "--porcelain", "--", "adacache_fx").splitlines()
                   if not line[3:].startswith("adacache_fx/tools/")]
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    if not commit:
        return "not a git checkout"
    return f"commit {commit}" + (f" + uncommitted core changes ({', '.join(changed)})" if changed else "")


def _provenance(command: str, seconds: float, fingerprint: str) -> list[str]:
    import diffusers
    import torch

    lines = [
        f"Command: `{command}`",
        "",
        f"adacache-fx {_git_state()}, core sources {fingerprint} (`core_fingerprint()`); torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}; one process per configuration, 1 torch thread. Configurations from diffusers' "
        f"tests at {DIFFUSERS_COMMIT[:12]}. Wall time {seconds / 60:.1f} min.",
    ]
    if core_fingerprint() != fingerprint:
        lines += ["", f"**The core's sources changed during the run** (now {core_fingerprint()}): rows may mix "
                      "two versions; run it again."]
    return lines


def _notes(configs, results: list[Result]) -> list[str]:
    """The configurations' notes, and which rows' metric never moved."""
    from .table import metric_is_zero

    lines = [f"- {c.name}: {note}" for c in configs for note in c.notes]
    zero = [r.name for r in results if metric_is_zero(r)]
    if zero:
        lines.append(f"- metric 0 on every step ({', '.join(zero)}): the output does not move with the timestep "
                     "at these sizes; the cached steps prove nothing about the metric.")
    lines.append("- never-skip max diff: the transform with presets.NEVER against the untransformed model over "
                 "the first calls (0: identical); state: what the capture's calls changed in the model that the "
                 "model's own calls do not; repeat / reset: a second generation, and one after a reset in the "
                 "middle of a third, reproduce the schedule and outputs exactly; where: the deepest diffusers "
                 "frame of the error, or where the captured graph first has a data-dependent size.")
    return ["Notes:", "", *lines] if lines else []


def _command(args) -> str:
    """The command line that reproduces ``args``."""
    parts = ["adacache-fx", "corpus"]
    if args.only:
        parts += ["--only", *args.only]
    if args.video:
        parts.append("--video")
    if args.compile:
        parts += ["--compile", args.compile]
    if getattr(args, "onnx", False):
        parts.append("--onnx")
    for flag, value, default in (("--steps", args.steps, NUM_STEPS), ("--never-skip-calls", args.never_skip_calls,
                                 NEVER_SKIP_CALLS), ("--timeout", args.timeout, TIMEOUT_S), ("--jobs", args.jobs, 1)):
        if value != default:
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if args.out:
        parts += ["--out", args.out]
    return " ".join(shlex.quote(p) for p in parts)


def cli_corpus(args) -> int:
    """Run the selected configurations, one subprocess each; print a progress line per configuration,
    then the table."""
    configs = select(args.only, args.video)
    if args.list:
        for c in CONFIGS:
            mark = "video" if c.video else ""
            print(f"{c.name:40s} {c.cls:42s} {mark:5s} {'skip: ' + c.skip[:60] if c.skip else ''}")
        return 0
    if not configs:
        print("no configuration matches", file=sys.stderr)
        return 2
    start = time.perf_counter()
    fingerprint = core_fingerprint()
    results: dict[str, Result] = {}
    total = len(configs)

    def run(config):
        return run_isolated(config.name, args.timeout, args.compile, args.steps, args.never_skip_calls,
                            getattr(args, "onnx", False))

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run, c): c for c in configs}
        for done, future in enumerate(as_completed(futures), 1):
            r = future.result()
            results[r.name] = r
            detail = (f"diff {diff_label(r.never_skip_diff)}, computed {computed_label(r)}" if r.status == "pass"
                      else error_label(r, 120))
            print(f"[{done:>{len(str(total))}}/{total}] {r.name:<38} {result_label(r):<24} {detail} "
                  f"({r.seconds:.1f} s)", flush=True)
    ordered = [results[c.name] for c in configs]
    seconds = time.perf_counter() - start
    table = markdown(ordered, with_compile=bool(args.compile), with_onnx=getattr(args, "onnx", False))
    print()
    print(table)
    print()
    print(summary(ordered) + f"; {seconds / 60:.1f} min")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        lines = ["# adacache-fx on diffusers' test configurations", "", *_provenance(_command(args), seconds, fingerprint), "",
                 summary(ordered) + ".", "", table, "", *_notes(configs, ordered), ""]
        (out / "corpus.md").write_text("\n".join(lines))
        (out / "corpus.csv").write_text(to_csv(ordered))
        print(f"wrote {out / 'corpus.md'} and {out / 'corpus.csv'}")
    return 0
