"""The ``adacache-fx`` command line."""

from __future__ import annotations

import argparse
import sys

import torch

from .. import presets
from ..policies import AdaCacheConfig
from .fixtures import sample_transformer, speed_wan


def cmd_speed(args) -> int:
    """Issue-3 figures: tiny Wan, eager, N steps: computed steps, speedup, cache memory stack vs block."""
    import adacache_fx as ax

    from .timing import measure_interleaved

    torch.set_num_threads(args.threads)
    model, latents, text = speed_wan(args.layers, args.head_dim, args.heads, args.frames, args.size)
    codebook = presets.PRESETS[args.codebook]
    variants = {"baseline": model}
    for granularity in ("stack", "block", "branch"):
        variants[granularity] = ax.transform(
            model, AdaCacheConfig(num_steps=args.steps, codebook=codebook, granularity=granularity)
        )
    outputs = {name: sample_transformer(m, latents, text, args.steps) for name, m in variants.items()}
    timings = measure_interleaved(
        {name: (lambda m=m: sample_transformer(m, latents, text, args.steps)) for name, m in variants.items()},
        repeats=args.repeats,
        warmup=0,
    )
    tokens = args.frames * (args.size // 2) ** 2
    print(
        f"tiny Wan: {args.layers} blocks, hidden {args.heads * args.head_dim}, {args.frames} latent frames of "
        f"{args.size}x{args.size} (patch 2: {tokens} tokens), {args.steps} steps, codebook {args.codebook}, "
        f"eager, {args.threads} threads, median of {args.repeats}"
    )
    print(f"{'variant':10s} {'computed':>9s} {'time s':>8s} {'speedup':>8s} {'cache MiB':>10s} {'max|diff|':>10s}")
    base = timings["baseline"].median_s
    for name in variants:
        if name == "baseline":
            computed, cache = f"{args.steps}", "-"
        else:
            rep = ax.report(variants[name])
            computed, cache = f"{rep.num_computed}", f"{rep.cache_bytes / 2**20:.3f}"
        diff = float((outputs[name] - outputs["baseline"]).abs().max())
        print(
            f"{name:10s} {computed:>9s} {timings[name].median_s:8.3f} {base / timings[name].median_s:8.2f}x "
            f"{cache:>10s} {diff:10.4f}"
        )
    return 0


def cmd_compile_bench(args) -> int:
    from .bench_compile import run

    return run(args)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def _lazy(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adacache-fx",
        description="AdaCache for video diffusion transformers as a torch.fx pass.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate videos with and without AdaCache and compare them")
    demo.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    demo.add_argument("--codebook", choices=sorted(presets.PRESETS), default="fast")
    demo.add_argument("--moreg", action="store_true", help="enable motion regularization")
    demo.add_argument("--all-variants", action="store_true", help="fast and slow codebooks, with and without MoReg")
    demo.add_argument("--captions", nargs="+", help="captions to generate (default: 4 built-in ones)")
    demo.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    demo.add_argument("--weights", default=None, help="folder of reference weights (default: bundled)")
    demo.add_argument("--out", default="adacache-fx-out", help="output folder")
    demo.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    demo.set_defaults(func=cmd_demo)

    speed = sub.add_parser("speed", help="eager speedup and cache memory on a tiny random Wan (stack, block, branch)")
    speed.add_argument("--layers", type=int, default=8)
    speed.add_argument("--heads", type=int, default=4)
    speed.add_argument("--head-dim", type=int, default=64)
    speed.add_argument("--frames", type=int, default=8)
    speed.add_argument("--size", type=int, default=16, help="latent height and width")
    speed.add_argument("--steps", type=int, default=30)
    speed.add_argument("--codebook", choices=sorted(presets.PRESETS), default="fast")
    speed.add_argument("--repeats", type=int, default=5)
    speed.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    speed.set_defaults(func=cmd_speed)

    bench = sub.add_parser(
        "compile-bench", help="torch.compile cost of the transform: full, never-skip, cached steps, compile time"
    )
    bench.add_argument("--layers", type=int, default=8)
    bench.add_argument("--heads", type=int, default=4)
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--frames", type=int, default=8)
    bench.add_argument("--size", type=int, default=16)
    bench.add_argument("--steps", type=int, default=30)
    bench.add_argument("--codebook", choices=sorted(presets.PRESETS), default="fast")
    bench.add_argument("--repeats", type=int, default=7)
    bench.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    bench.set_defaults(func=cmd_compile_bench)

    export = sub.add_parser("export", help="export a transformed model to ONNX (If nodes, explicit state) or TensorRT")
    _lazy("adacache_fx.tools.export_cli", "add_export_arguments")(export)
    export.set_defaults(func=_lazy("adacache_fx.tools.export_cli", "cli_export"))

    motion = sub.add_parser("motion", help="computed steps per motion class (still, slow, fast) on the reference model")
    _lazy("adacache_fx.tools.motion_classes", "add_motion_arguments")(motion)
    motion.set_defaults(func=_lazy("adacache_fx.tools.motion_classes", "cli_motion"))

    par = sub.add_parser("parallel-bench", help="context parallelism: 1 process against N gloo ranks (computed steps, collectives, time)")
    _lazy("adacache_fx.tools.parallel_bench", "add_parallel_bench_arguments")(par)
    par.set_defaults(func=_lazy("adacache_fx.tools.parallel_bench", "cli_parallel_bench"))

    peers = sub.add_parser("bench", help="AdaCache against the peers (diffusers cache hooks, cache-dit) on the reference model")
    _lazy("adacache_fx.tools.bench", "add_bench_arguments")(peers)
    peers.set_defaults(func=_lazy("adacache_fx.tools.bench", "cli_bench"))

    corpus = sub.add_parser(
        "corpus", help="diffusers' own tiny test configurations of every transformer class through the transform: "
                       "never-skip exactness, state left unchanged, default schedule, repeat and reset (a table)",
        description="Build the tiny configuration diffusers' test suite uses for each transformer class (seeded, "
                    "float32), and check, one subprocess per configuration: the transform with every step computed "
                    "equals the model; capture leaves the model's state as it found it; the default policy's "
                    "computed steps over N calls; a second generation and a reset mid-generation reproduce them; "
                    "optionally torch.compile(fullgraph=True). Prints a progress line per configuration, then the "
                    "table; --out writes corpus.md and corpus.csv.",
    )
    _lazy("adacache_fx.tools.corpus.cli", "add_corpus_arguments")(corpus)
    corpus.set_defaults(func=_lazy("adacache_fx.tools.corpus.cli", "cli_corpus"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
