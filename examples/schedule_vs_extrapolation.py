"""Is TaylorSeer ahead of AdaCache on the reference model because of its forecast or its schedule?

Runs, on the bundled reference model (30 steps, CFG 3, seed 0, every fourth evaluation caption):
no caching; diffusers' TaylorSeer (interval 4, order 1, on the blocks, as in ``adacache-fx bench``); and
adacache-fx forced to TaylorSeer's schedule (``compute_steps``), reusing the residual (AdaCache) and
extrapolating it linearly (``extrapolation_order=1``). Prints computed steps and PSNR against the uncached
videos (of the mean squared error over all videos, as the bench does).

    python examples/schedule_vs_extrapolation.py [--captions 6] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
from diffusers.hooks import TaylorSeerCacheConfig

import adacache_fx as ax
from adacache_fx.tools.bench import EVAL_CAPTIONS
from adacache_fx.tools.metrics import psnr
from adacache_fx.tools.reference.pipeline import ReferencePipeline

STEPS = 30
INTERVAL = 4
WARMUP = 3  # TaylorSeerCacheConfig's disable_cache_before_step default


def taylorseer_schedule(steps: int, interval: int, warmup: int) -> tuple[int, ...]:
    """1-based steps TaylorSeer computes (its rule: index < warmup, or (index - warmup - 1) % interval == 0)."""
    return tuple(i + 1 for i in range(steps) if i < warmup or (i - warmup - 1) % interval == 0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=6, help="number of evaluation captions (every 4th)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    captions = EVAL_CAPTIONS[::4][: args.captions]
    pipe = ReferencePipeline.from_reference()
    pipe.set_progress_bar_config(disable=True)
    base = pipe.transformer

    def videos():
        out = []
        for caption in captions:
            out.append(pipe(caption, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).frames[0])
            pipe.maybe_free_model_hooks()  # resets diffusers' hook state between videos
        return out

    reference = videos()

    def pooled_psnr(outs) -> float:  # of the mean squared error over all videos, as the bench
        return psnr(torch.stack(outs), torch.stack(reference))

    schedule = taylorseer_schedule(STEPS, INTERVAL, WARMUP)
    rows = []
    base.enable_cache(TaylorSeerCacheConfig(cache_interval=INTERVAL, max_order=1, taylor_factors_dtype=torch.float32,
                                            cache_identifiers=[r"blocks\.\d+"]))
    try:
        rows.append(("diffusers TaylorSeer, interval 4, order 1", len(schedule), pooled_psnr(videos())))
    finally:
        base.disable_cache()
    for order, name in ((0, "reuse (AdaCache)"), (1, "linear extrapolation")):
        pipe.transformer = ax.transform(base, ax.AdaCacheConfig(num_steps=STEPS, compute_steps=schedule,
                                                                extrapolation_order=order))
        try:
            rows.append((f"adacache-fx, TaylorSeer's schedule, {name}", len(schedule), pooled_psnr(videos())))
        finally:
            pipe.transformer = base
    print(f"reference model, {STEPS} steps, {len(captions)} captions, seed 0; TaylorSeer's schedule: {schedule}")
    print(f"| method | computed / {STEPS} | PSNR dB |\n|---|---|---|")
    for name, computed, value in rows:
        print(f"| {name} | {computed} | {value:.2f} |")


if __name__ == "__main__":
    main()
