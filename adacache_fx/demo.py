"""``adacache-fx demo``: a generation with and without AdaCache, compared."""

from __future__ import annotations

import torch

from . import presets
from .config import AdaCacheConfig, MoRegConfig
from .timing import measure_interleaved


def run_demo(args) -> int:
    import adacache_fx as ax

    from .cli import _euler_loop, _tiny_wan

    torch.set_num_threads(args.threads)
    model, latents, text = _tiny_wan(num_layers=8, dim_head=32, heads=4, frames=8, size=16)
    config = AdaCacheConfig(
        num_steps=args.steps,
        codebook=presets.PRESETS[args.codebook],
        moreg=MoRegConfig() if args.moreg else None,
    )
    cached = ax.transform(model, config)
    baseline_video = _euler_loop(model, latents, text, args.steps)
    cached_video = _euler_loop(cached, latents, text, args.steps)
    rep = ax.report(cached)
    timings = measure_interleaved(
        {
            "baseline": lambda: _euler_loop(model, latents, text, args.steps),
            "adacache": lambda: _euler_loop(cached, latents, text, args.steps),
        },
        repeats=3,
        warmup=0,
    )
    diff = (cached_video - baseline_video).abs()
    print(f"tiny random-weight Wan (8 blocks, 512 tokens), {args.steps} steps, codebook {args.codebook}")
    print(f"computed steps: {rep.num_computed}/{args.steps} {rep.computed_steps}")
    base, fast = timings["baseline"].median_s, timings["adacache"].median_s
    print(f"wall time: baseline {base:.2f} s, adacache {fast:.2f} s, speedup {base / fast:.2f}x (median of 3)")
    print(f"output difference: max {float(diff.max()):.4f}, mean {float(diff.mean()):.4f}")
    return 0
