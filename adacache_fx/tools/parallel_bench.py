"""``adacache-fx parallel-bench``: AdaCache under context parallelism, 1 process against N gloo ranks on CPU.

A tiny Wan (``fixtures.build("wan")``) generates ``--steps`` steps per codebook, once in this process and
once on ``--world`` spawned ranks under diffusers' Ulysses (``ContextParallelConfig(ulysses_degree=N)``).
Per codebook: steps computed on each rank, the collectives of the captured graph (in the main graph: every
step; in the compute branches: compute steps only), and the median wall time of a generation.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

CODEBOOKS = {
    "every step computes": {1e9: 1},
    "rate 3 after step 2": {1e9: 3},
}


def collectives_by_place(cached) -> tuple[Counter, Counter]:
    """``(every step, compute steps only)``: counts of collective ops (by name) in the captured program."""
    from ..backends import cond_nodes
    from ..passes.reduce_metric import collectives

    (program,) = cached.programs.values()
    gm = program.graph_module
    branch_modules = {getattr(gm, node.args[1].target) for node, *_ in cond_nodes(gm)}
    in_branches = Counter(n.target._opname for m in branch_modules for n in collectives(m))
    everywhere = Counter(n.target._opname for n in collectives(gm))
    return everywhere - in_branches, in_branches


def _generate(cached, make_inputs, steps: int):
    with torch.no_grad():
        return [cached(**make_inputs(s)) for s in range(steps)]


def measure(model, make_inputs, steps: int, repeats: int) -> dict:
    """Per codebook: computed steps, collectives, median seconds of a generation (after one warm-up)."""
    import adacache_fx as ax

    results = {}
    for name, codebook in CODEBOOKS.items():
        cached = ax.transform(model, ax.AdaCacheConfig(num_steps=steps, codebook=codebook))
        _generate(cached, make_inputs, steps)  # capture
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _generate(cached, make_inputs, steps)
            times.append(time.perf_counter() - start)
        every, compute = collectives_by_place(cached)
        results[name] = {"computed": ax.report(cached).num_computed, "every_step": dict(every),
                         "compute_step": dict(compute), "median_s": statistics.median(times)}
    return results


def _worker(rank: int, world: int, port: int, out_dir: str, layers: int, steps: int, repeats: int) -> None:
    from diffusers import ContextParallelConfig

    from .fixtures import build
    from .fixtures.parallel import cpu_device_count, gloo_process_group

    with gloo_process_group(rank, world, port):
        model, make_inputs = build("wan", layers)
        with cpu_device_count():
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        torch.save(measure(model, make_inputs, steps, repeats), os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(world: int, layers: int, steps: int, repeats: int, timeout_s: float = 600) -> list[dict]:
    """:func:`measure` on ``world`` spawned gloo ranks; one result per rank."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker, args=(world, port, out_dir, layers, steps, repeats), nprocs=world,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world} ranks did not finish within {timeout_s} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def _codebook(codebook: dict) -> str:
    return "{" + ", ".join(f"{t:g}: {r}" for t, r in codebook.items()) + "}"


def _fmt(counts: dict) -> str:
    return " + ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "-"


def format_table(single: dict, ranks: list[dict], world: int) -> str:
    lines = [f"| codebook | steps computed (1 process / each of {world} ranks) | collectives every step | "
             f"collectives per compute step (+) | 1 process ms | {world} ranks ms | {world} ranks / 1 process |",
             "|---|---|---|---|---|---|---|"]
    for name in CODEBOOKS:
        one, many = single[name], [r[name] for r in ranks]
        slowest = max(r["median_s"] for r in many)
        lines.append(
            f"| {name} (`{_codebook(CODEBOOKS[name])}`) | {one['computed']} / {', '.join(str(r['computed']) for r in many)} | "
            f"{_fmt(many[0]['every_step'])} | {_fmt(many[0]['compute_step'])} | {one['median_s'] * 1e3:.1f} | "
            f"{slowest * 1e3:.1f} | {slowest / one['median_s']:.2f}x |")
    return "\n".join(lines)


def cli_parallel_bench(args) -> int:
    from .fixtures import build

    torch.set_num_threads(1)
    print(f"tiny Wan, {args.layers} blocks, {args.steps} steps, eager, 1 thread per process, median of "
          f"{args.repeats} generations; {args.world} gloo ranks under Ulysses")
    single = measure(*build("wan", args.layers), args.steps, args.repeats)
    ranks = run_ranks(args.world, args.layers, args.steps, args.repeats)
    table = format_table(single, ranks, args.world)
    print(table)
    if args.out:
        command = (f"adacache-fx parallel-bench --world {args.world} --layers {args.layers} --steps {args.steps} "
                   f"--repeats {args.repeats}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"`{command}`\n\n{table}\n")
    return 0


def add_parallel_bench_arguments(parser) -> None:
    parser.add_argument("--world", type=int, default=2, help="ranks (gloo, CPU; default 2)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=9, help="timed generations per codebook (median)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
