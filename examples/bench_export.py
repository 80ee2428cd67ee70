"""Benchmark AdaCache in ONNX Runtime (CPU) against torch eager and torch.compile, on one tiny Wan.

For each runtime: the time of a full (computed) step and of a cached step, and a 30-step Euler
generation with the fast codebook against the untransformed model in the same runtime. Steps are
forced with ``AdaCacheConfig(compute_steps=(1,))``: after a reset the first call computes, the next
ones reuse the cache. Medians of ``--repeats`` runs after a warm-up, all in one process.

    python examples/bench_export.py [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

import adacache_fx as ax
from adacache_fx.export import OnnxRunner, to_onnx
from adacache_fx.tools.fixtures import euler_flow, flow_sigmas, speed_wan
from adacache_fx.tools.timing import measure

LONG = 1000  # N of the forced schedule: steps 2..LONG are cached


def step_inputs(x, t: float, text) -> dict:
    return {"hidden_states": x, "timestep": torch.tensor([t]), "encoder_hidden_states": text, "return_dict": False}


def generate(fn, latents, text, num_steps: int, reset=None):
    """A flow-matching Euler generation; ``reset()`` first starts a new AdaCache generation."""
    if reset is not None:
        reset()
    return euler_flow(lambda x, sigma, _: fn(**step_inputs(x, float(sigma) * 1000, text))[0], latents,
                      flow_sigmas(num_steps))


def _reset(fn):
    """The ``reset`` of a runner, a CachedModel or a compiled CachedModel."""
    return getattr(fn, "_orig_mod", fn).reset


def bench_runtime(forced_fn, fast_fn, plain_fn, example, latents, text, args):
    """``((full s, cached s, untransformed generation s, AdaCache generation s, computed), video)``."""
    for fn in (forced_fn, fast_fn, plain_fn):
        fn(**example)  # warm-up (and compilation)

    def full_step():
        _reset(forced_fn)()  # step 1 of a new generation: computes
        forced_fn(**example)

    full = measure(full_step, args.repeats, warmup=2).median_s
    full_step()
    cached = measure(lambda: forced_fn(**example), args.repeats, warmup=2).median_s  # steps 2..LONG: cached
    plain = measure(lambda: generate(plain_fn, latents, text, args.steps), args.repeats).median_s
    adacache = measure(lambda: generate(fast_fn, latents, text, args.steps, _reset(fast_fn)), args.repeats).median_s
    video = generate(fast_fn, latents, text, args.steps, _reset(fast_fn))
    report = fast_fn.report() if isinstance(fast_fn, OnnxRunner) else ax.report(fast_fn)
    return (full, cached, plain, adacache, report.num_computed), video


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of torch and ONNX Runtime")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure (median)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(f"$ python {shlex.join(sys.argv)}\n", flush=True)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    import onnxruntime as ort

    model, latents, text = speed_wan(num_layers=8, head_dim=32, heads=4, frames=8, size=16)  # 512 tokens
    example = step_inputs(latents, 999.0, text)
    forced = ax.AdaCacheConfig(num_steps=LONG, compute_steps=(1,))
    fast = ax.AdaCacheConfig(num_steps=args.steps, codebook=ax.presets.FAST_30)
    scratch = tempfile.TemporaryDirectory(prefix="adacache-bench-")  # removed at exit
    folder = Path(scratch.name)

    def stage(name, fn):
        start = time.perf_counter()
        result = fn()
        print(f"  {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return result

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = args.threads, 1, 3
    plain_onnx = folder / "plain.onnx"
    stage("ONNX export, untransformed", lambda: torch.onnx.export(
        model, (), kwargs=example, dynamo=True, verbose=False).save(str(plain_onnx)))
    for name, config in (("forced", forced), ("fast", fast)):
        stage(f"ONNX export, {name}", lambda c=config, n=name: to_onnx(ax.transform(model, c), example, folder / f"{n}.onnx"))
    plain_session = ort.InferenceSession(str(plain_onnx), options, providers=["CPUExecutionProvider"])
    plain_inputs = [i.name for i in plain_session.get_inputs()]

    def ort_plain(**kwargs):
        feeds = {name: kwargs[name].numpy() for name in plain_inputs}
        return [torch.from_numpy(plain_session.run(None, feeds)[0])]

    runtimes = {}
    runners = {n: OnnxRunner(folder / f"{n}.onnx", session_options=options) for n in ("forced", "fast")}
    runtimes["ONNX Runtime (CPU)"] = (runners["forced"], runners["fast"], ort_plain)
    runtimes["torch eager"] = (ax.transform(model, forced), ax.transform(model, fast), model)
    compiled = [torch.compile(m, fullgraph=True) for m in (ax.transform(model, forced), ax.transform(model, fast), model)]
    runtimes["torch.compile (inductor)"] = tuple(compiled)

    rows, reference = [], None
    for runtime, fns in runtimes.items():
        row, video = stage(f"{runtime}: compile, warm up and time", lambda f=fns: bench_runtime(*f, example, latents, text, args))
        reference = video if reference is None else reference
        rows.append((runtime, *row, float((video - reference).abs().max() / reference.abs().max())))

    print(f"tiny Wan: 8 blocks, 4 heads x 32 dims, 8 latent frames of 16x16 (patch 2: 512 tokens); CPU, "
          f"{args.threads} thread(s); median of {args.repeats} runs after warm-up\n")
    print(f"| runtime | full step (ms) | cached step (ms) | {args.steps} steps untransformed (ms) "
          f"| {args.steps} steps AdaCache fast (ms) | computed steps | speedup | max rel. diff vs ORT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for runtime, full, cached, plain, adacache, computed, diff in rows:
        print(f"| {runtime} | {full * 1e3:.1f} | {cached * 1e3:.2f} | {plain * 1e3:.0f} | {adacache * 1e3:.0f} "
              f"| {computed}/{args.steps} | {plain / adacache:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
