"""``adacache-fx compile-bench``: the cost of the transform under torch.compile, on a tiny Wan.

One process, medians of repeated runs after warm-up, every ratio against a baseline measured in the
same run. Prints a Markdown table.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import nn

from .. import presets
from ..api import report, reset, transform
from ..policies import AdaCacheConfig
from .fixtures import speed_wan
from .timing import measure


class _PassThrough(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _step_fn(model, kwargs):
    def step():
        with torch.no_grad():
            return model(**kwargs)

    return step


def _cold_compile(model, kwargs) -> tuple[nn.Module, float]:
    compiled = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    _step_fn(compiled, kwargs)()
    return compiled, time.perf_counter() - start


def run(args) -> int:
    torch.set_num_threads(args.threads)
    model, latents, text = speed_wan(args.layers, args.head_dim, args.heads, args.frames, args.size)
    kwargs = {"hidden_states": latents, "timestep": torch.tensor([500.0]), "encoder_hidden_states": text,
              "return_dict": False}
    n = args.steps
    rows = []

    def ms(timing):
        return timing.median_s * 1e3

    print(f"$ adacache-fx compile-bench {' '.join(sys.argv[2:])}".rstrip())
    print(f"tiny Wan: {args.layers} blocks, hidden {args.heads * args.head_dim}, {args.frames} latent frames of "
          f"{args.size}x{args.size} (patch 2), CPU {args.threads} threads, inductor, median of {args.repeats}\n")

    torch._dynamo.reset()
    eager_step = measure(_step_fn(model, kwargs), args.repeats)
    plain, plain_cold = _cold_compile(model, kwargs)
    plain_step = measure(_step_fn(plain, kwargs), args.repeats)

    never = transform(model, AdaCacheConfig(num_steps=10**6, codebook=presets.NEVER))
    never_c, never_cold = _cold_compile(never, kwargs)
    never_step = measure(_step_fn(never_c, kwargs), args.repeats)

    skipping = transform(model, AdaCacheConfig(num_steps=10**6, compute_steps=(1,)))
    skipping_c, _ = _cold_compile(skipping, kwargs)  # step 1 computes; every later step is cached
    cached_step = measure(_step_fn(skipping_c, kwargs), args.repeats)

    blocks = model.blocks
    model.blocks = nn.ModuleList(_PassThrough() for _ in blocks)
    try:
        outside_c, _ = _cold_compile(model, kwargs)
        outside_step = measure(_step_fn(outside_c, kwargs), args.repeats)
    finally:
        model.blocks = blocks
    torch._dynamo.reset()

    fast = transform(model, AdaCacheConfig(num_steps=n, codebook=presets.PRESETS[args.codebook]))
    fast_c = torch.compile(fast, fullgraph=True)
    plain_c = torch.compile(model, fullgraph=True)

    def generation(m):
        def run_all():
            with torch.no_grad():
                for i in range(n):
                    kwargs["timestep"] = torch.tensor([1000.0 * (1 - i / n)])
                    m(**kwargs)

        return run_all

    base_gen = measure(generation(plain_c), max(3, args.repeats // 2))
    fast_gen = measure(generation(fast_c), max(3, args.repeats // 2))
    rep = report(fast)
    reset(fast)
    computed = rep.num_computed
    ideal = n * ms(never_step) / (computed * ms(never_step) + (n - computed) * ms(cached_step))
    measured = base_gen.median_s / fast_gen.median_s

    rows.append(("untransformed, eager", f"{ms(eager_step):.2f} ms/step", ""))
    rows.append(("untransformed, compiled", f"{ms(plain_step):.2f} ms/step", "baseline"))
    rows.append(("transformed never-skip, compiled", f"{ms(never_step):.2f} ms/step",
                 f"{100 * (ms(never_step) / ms(plain_step) - 1):+.1f}% vs baseline (target within 3%)"))
    rows.append(("transformed, compiled, cached step", f"{ms(cached_step):.2f} ms",
                 f"outside the stack {ms(outside_step):.2f} ms; excess "
                 f"{100 * (ms(cached_step) - ms(outside_step)) / ms(plain_step):+.1f}% of a full step (target <= 2%)"))
    rows.append((f"{n}-step generation, {args.codebook} codebook", f"{computed}/{n} computed",
                 f"speedup {measured:.2f}x measured, {ideal:.2f}x ideal, ratio {measured / ideal:.2f} (target >= 0.95)"))
    rows.append(("cold compile", f"transformed {never_cold:.1f} s", f"untransformed {plain_cold:.1f} s"))
    print("| measurement | value | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    spread = statistics.mean(t.spread for t in (plain_step, never_step, cached_step))
    print(f"\nmean relative spread (max-min)/median of the step timings: {spread:.1%}")
    return 0
