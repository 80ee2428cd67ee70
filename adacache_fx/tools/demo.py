"""``adacache-fx demo``: captions through the bundled reference model, without and with AdaCache.

Per caption: computed steps, wall time (median of interleaved runs), speedup, PSNR and SSIM of the cached
video against the uncached one, and whether each video follows its caption (the synthetic-data check).
Writes a side-by-side GIF per caption and a schedule plot into the output folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import presets
from ..policies import AdaCacheConfig, MoRegConfig
from .metrics import psnr, ssim
from .timing import measure_interleaved

DEMO_CAPTIONS = (
    "a large red circle staying still",
    "a small blue square moving right slow",
    "a large yellow triangle moving down fast",
    "a small white circle moving left fast",
)

VARIANTS = {
    "fast": (presets.FAST_30, False),
    "fast+moreg": (presets.FAST_30, True),
    "slow": (presets.SLOW_30, False),
    "slow+moreg": (presets.SLOW_30, True),
}


@dataclass
class DemoRow:
    variant: str
    caption: str
    computed: int
    steps: int
    baseline_s: float
    cached_s: float
    psnr: float
    ssim: float
    baseline_ok: bool
    cached_ok: bool
    schedule: object  # the adacache_fx.Report of the cond context

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.cached_s


def _config(variant: str, steps: int) -> AdaCacheConfig:
    codebook, moreg = VARIANTS[variant]
    return AdaCacheConfig(codebook=codebook, moreg=MoRegConfig() if moreg else None, num_steps=steps)


def run_variants(pipe, captions, variants, steps, repeats, seed=0, progress=print) -> tuple[list[DemoRow], dict]:
    """Generate every caption uncached and with each variant; time interleaved runs; compare."""
    import adacache_fx as ax

    from .reference import check_clip, parse_caption

    baseline_transformer = pipe.transformer
    cached = {v: ax.transform(baseline_transformer, _config(v, steps)) for v in variants}
    rows, videos = [], {}
    for caption in captions:
        def generate(transformer, caption=caption):
            pipe.transformer = transformer
            g = torch.Generator().manual_seed(seed)
            return pipe(caption, num_inference_steps=steps, generator=g).frames[0]

        progress(f"  {caption}: baseline and {len(variants)} cached variant(s), {repeats} timed runs each")
        base_video = generate(baseline_transformer)
        outputs = {v: generate(cached[v]) for v in variants}
        reports = {v: ax.report(cached[v], "cond") for v in variants}
        timings = measure_interleaved(
            {"baseline": lambda: generate(baseline_transformer), **{v: (lambda v=v: generate(cached[v])) for v in variants}},
            repeats=repeats,
            warmup=0,
        )
        parsed = parse_caption(caption)
        base_ok = check_clip(base_video.permute(1, 0, 2, 3) * 2 - 1, parsed).ok
        videos[caption] = {"baseline": base_video, **outputs}
        for v in variants:
            video = outputs[v]
            rows.append(
                DemoRow(
                    variant=v, caption=caption, computed=reports[v].num_computed, steps=steps,
                    baseline_s=timings["baseline"].median_s, cached_s=timings[v].median_s,
                    psnr=psnr(video, base_video), ssim=ssim(video, base_video), baseline_ok=base_ok,
                    cached_ok=check_clip(video.permute(1, 0, 2, 3) * 2 - 1, parsed).ok,
                    schedule=reports[v],
                )
            )
    pipe.transformer = baseline_transformer
    return rows, videos


def format_table(rows: list[DemoRow]) -> str:
    lines = [
        "| variant | caption | computed | baseline s | cached s | speedup | PSNR dB | SSIM | caption ok (base/cached) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.caption} | {r.computed}/{r.steps} | {r.baseline_s:.2f} | {r.cached_s:.2f} | "
            f"{r.speedup:.2f}x | {r.psnr:.2f} | {r.ssim:.4f} | {'yes' if r.baseline_ok else 'no'}/"
            f"{'yes' if r.cached_ok else 'no'} |"
        )
    return "\n".join(lines)


def write_gif(path: Path, left: torch.Tensor, right: torch.Tensor, scale: int = 4) -> None:
    """Side by side (uncached | cached), frames [T, C, H, W] in [0, 1], upscaled for viewing."""
    from PIL import Image

    both = torch.cat([left, torch.ones_like(left[..., :2]), right], dim=-1)
    frames = (both.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    images = [Image.fromarray(np.kron(f, np.ones((scale, scale, 1), dtype=np.uint8))) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=180, loop=0)


def plot_schedules(path: Path, rows: list[DemoRow], codebook_thresholds) -> None:
    """Per caption: computed/cached per step, the metric c and the rate the codebook chose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.3 * len(rows)), sharex=True, squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        steps = [r.step for r in row.schedule.steps]
        computed = [r.computed for r in row.schedule.steps]
        ax.bar(steps, [1 if c else 0.25 for c in computed], color=["tab:blue" if c else "lightgray" for c in computed],
               width=0.8, label="computed (blue) / cached (gray)")
        metric = [r["metric"] if r["metric"] is not None else math.nan for r in row.schedule.steps]
        ax2 = ax.twinx()
        ax2.plot(steps, metric, "o-", color="tab:red", label="metric c")
        for t in codebook_thresholds:
            ax2.axhline(t, color="tab:red", alpha=0.15, lw=0.8)
        ax2.step(steps, [r["rate"] / 10 for r in row.schedule.steps], where="post", color="tab:green", label="rate / 10")
        ax.set_yticks([])
        ax.set_title(f"{row.variant}: {row.caption} ({row.computed}/{row.steps} computed)", fontsize=9)
        ax2.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("denoising step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(args) -> int:
    from .reference.pipeline import ReferencePipeline

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = ReferencePipeline.from_reference(args.weights)
    pipe.set_progress_bar_config(disable=True)
    variants = list(VARIANTS) if args.all_variants else [args.codebook + ("+moreg" if args.moreg else "")]
    captions = args.captions or list(DEMO_CAPTIONS)
    from .reference import weights_label

    print(f"reference model {weights_label(args.weights, pipe.transformer)}, "
          f"{args.steps} steps, CFG, variants {variants}")
    rows, videos = run_variants(pipe, captions, variants, args.steps, args.repeats)
    table = format_table(rows)
    print(table)
    (out / "demo.md").write_text(table + "\n")
    for i, caption in enumerate(captions):
        for v in variants:
            write_gif(out / f"{i:02d}_{v}_{caption.replace(' ', '_')}.gif", videos[caption]["baseline"], videos[caption][v])
    plot_schedules(out / "schedules.png", rows, list(VARIANTS[variants[0]][0]))
    print(f"\nwrote {len(captions) * len(variants)} side-by-side GIFs (uncached | cached), schedules.png and "
          f"demo.md to {out.resolve()}")
    return 0
