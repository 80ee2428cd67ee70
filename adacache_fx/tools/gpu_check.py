"""One-shot check of the TensorRT paths on a GPU: ``python -m adacache_fx.tools.gpu_check``.

Runs the same N-step generation (Euler loop, FAST_30 codebook) four ways: the model without caching,
the AdaCache model in eager PyTorch, ``adacache_fx.compile(backend="tensorrt")`` (Torch-TensorRT
engines per region) and an ONNX file with the TensorRT profile built into one TensorRT engine
(``build_tensorrt_engine`` + ``TensorRTRunner``). TF32 is off everywhere. Prints one table: error of
the final latents against the eager AdaCache model, whether the computed steps agree, median ms per
full and per cached step, the generation's total and its speedup over the uncached model, and whether the
cached steps skip the blocks (engine launches = computed steps; a cached step under half a full
one). Exits 0 if every check passes, 1 if one fails, 2 if there is no CUDA device or a package is
missing. ``scripts/gpu_check.sh`` runs it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}


@dataclass
class Row:
    path: str
    error: float | None = None
    schedule_ok: bool | None = None
    full_ms: float | None = None
    cached_ms: float | None = None
    total_ms: float = 0.0
    skips: str = "-"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation(step_fn, call: dict, num_steps: int, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """Euler steps ``x <- x - v / N`` from ``call``'s latents; returns the final latents and ms per step."""
    x, times = call["hidden_states"].clone(), []
    with torch.no_grad():
        for s in range(num_steps):
            t = torch.full_like(call["timestep"], 999 - s * 999 // num_steps)
            _sync(device)
            start = time.perf_counter()
            v = step_fn(**{**call, "hidden_states": x, "timestep": t})[0]
            _sync(device)
            times.append(1000 * (time.perf_counter() - start))
            x = x - v.to(x.dtype) / num_steps
    return x, times


def _timed_row(name, step_fn, call, num_steps, device, computed, reference) -> Row:
    generation(step_fn, call, num_steps, device)  # warm-up: capture, engine builds, autotuning
    from ..export.runner import StatefulRunner
    from ..module import CachedModel

    if isinstance(step_fn, (CachedModel, StatefulRunner)):  # a new generation
        step_fn.reset()
    final, times = generation(step_fn, call, num_steps, device)
    row = Row(name, total_ms=sum(times))
    full = [ms for s, ms in enumerate(times, 1) if s in computed]
    cached = [ms for s, ms in enumerate(times, 1) if s not in computed]
    row.full_ms = statistics.median(full) if full else None
    row.cached_ms = statistics.median(cached) if cached else None
    if reference is not None:
        row.error = float((final.float() - reference.float()).abs().max() / reference.float().abs().max())
    return row


def run(model_name: str, layers: int, num_steps: int, dtype: torch.dtype, device: torch.device, workdir: Path):
    """The table's rows, and whether every check passed."""
    import adacache_fx as ax

    from ..export.onnx import to_onnx
    from ..export.tensorrt import TensorRTRunner, build_tensorrt_engine
    from .export_cli import build_model

    model, call = build_model(model_name, layers)
    model = model.to(device=device, dtype=dtype)
    call = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    call["hidden_states"] = call["hidden_states"].to(dtype)
    call["encoder_hidden_states"] = call["encoder_hidden_states"].to(dtype)
    config = ax.AdaCacheConfig(num_steps=num_steps, codebook=ax.presets.FAST_30)
    rows, ok = [], True

    eager = ax.transform(model, config)
    final, _ = generation(eager, call, num_steps, device)
    computed = set(ax.report(eager).computed_steps)
    rows.append(_timed_row("torch, no cache", model, call, num_steps, device, set(range(1, num_steps + 1)), None))
    ax.reset(eager)
    rows.append(_timed_row("torch eager + AdaCache", eager, call, num_steps, device, computed, final))
    rows[-1].schedule_ok = set(ax.report(eager).computed_steps) == computed

    compiled = ax.compile(model, backend="tensorrt", config=config, disable_tf32=True)
    row = _timed_row("compile(backend='tensorrt')", compiled, call, num_steps, device, computed, final)
    row.schedule_ok = set(ax.report(compiled).computed_steps) == computed
    (program,) = compiled.programs.values()
    from ..backends import TensorRTBranch, cond_nodes

    gm = program.graph_module
    branches = [getattr(gm, true_fn.target) for _, _, true_fn, _, _ in cond_nodes(gm)]
    launches = [b.calls for b in branches if isinstance(b, TensorRTBranch)]
    replaced = len(launches) == len(branches) and all(b.engine is not None for b in branches)
    expected_launches = 2 * len(computed)  # warm-up and timed generations
    row.skips = f"{'yes' if replaced and set(launches) == {expected_launches} else 'NO'} ({launches} launches)"
    rows.append(row)

    onnx_path = workdir / "gpu_check.onnx"
    to_onnx(ax.transform(model, config), call, onnx_path, target="tensorrt")
    engine = build_tensorrt_engine(onnx_path, workdir / "gpu_check.engine", fp16=dtype != torch.float32, tf32=False)
    runner = TensorRTRunner(engine, device=device)
    row = _timed_row("ONNX -> TensorRT engine", runner, call, num_steps, device, computed, final)
    row.schedule_ok = set(runner.report().computed_steps) == computed
    rows.append(row)

    for row in rows[2:]:
        if row.path.startswith("ONNX"):
            fast = row.cached_ms is not None and row.full_ms is not None and row.cached_ms < 0.5 * row.full_ms
            row.skips = f"{'yes' if fast else 'NO'} (cached/full {row.cached_ms / row.full_ms:.2f})" \
                if row.cached_ms and row.full_ms else "NO (no cached step)"
        ok &= bool(row.schedule_ok) and row.error is not None and row.error < TOLERANCE[dtype]
        ok &= row.skips.startswith("yes")
    return rows, ok, sorted(computed)


def format_table(rows: list[Row], baseline_ms: float) -> str:
    def num(value, fmt="{:.2f}"):
        return "-" if value is None else fmt.format(value)

    header = ["path", "max rel err", "same steps", "ms/full", "ms/cached", "total ms", "speedup", "cached steps skip blocks"]
    lines = [[r.path, num(r.error, "{:.1e}"), "-" if r.schedule_ok is None else ("yes" if r.schedule_ok else "NO"),
              num(r.full_ms), num(r.cached_ms), num(r.total_ms, "{:.1f}"), f"{baseline_ms / r.total_ms:.2f}x", r.skips]
             for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    return "\n".join(" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adacache_fx.tools.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="wan", help="a built-in tiny model (wan, cogvideox, latte) or reference")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: only with the tests' stand-ins
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: needs a CUDA device and torch with CUDA; none is available here "
              "(torch.cuda.is_available() is False). Run it on a GPU machine with pip install 'adacache-fx[gpu]'.",
              file=sys.stderr)
        return 2
    missing = [name for name in ("tensorrt", "torch_tensorrt") if not _importable(name)]
    if missing:
        print(f"gpu_check: {', '.join(missing)} not installed: pip install 'adacache-fx[gpu]'", file=sys.stderr)
        return 2
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with tempfile.TemporaryDirectory() as workdir:
            rows, ok, computed = run(args.model, args.layers, args.steps, DTYPES[args.dtype], device, Path(workdir))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    print(f"{args.model}, {args.layers} layers, {args.steps} steps, {args.dtype}; computed steps {computed}")
    print(format_table(rows, rows[0].total_ms))
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
