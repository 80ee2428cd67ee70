"""``adacache-fx motion``: does the AdaCache schedule follow the content?

AdaCache computes more steps for videos with more motion (the paper's premise). On the reference model's
fixed evaluation captions this tool generates every caption uncached and with each AdaCache variant, and
reports per motion class (still, slow, fast): how much the uncached video moves, how often it passes its
caption check, and the median number of computed steps of each variant.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import presets
from ..policies import AdaCacheConfig, MoRegConfig

SPEED_CLASSES = ("still", "slow", "fast")
#: Captions the calibrated variant's codebook is fitted on: drawn apart from the evaluation set.
CALIBRATION_SEED, NUM_CALIBRATION_CAPTIONS = 7, 6


def variants(steps: int, calibrated: dict[float, int] | None = None) -> dict[str, AdaCacheConfig]:
    """The official fast codebook with and without MoReg, and (given) a codebook fitted to the model."""
    configs = {
        "fast": AdaCacheConfig(num_steps=steps, codebook=presets.FAST_30),
        "fast+moreg": AdaCacheConfig(num_steps=steps, codebook=presets.FAST_30, moreg=MoRegConfig()),
    }
    if calibrated is not None:
        configs["calibrated"] = AdaCacheConfig(num_steps=steps, codebook=calibrated)
        configs["calibrated+moreg"] = AdaCacheConfig(num_steps=steps, codebook=calibrated, moreg=MoRegConfig())
    return configs


def calibration_captions() -> list[str]:
    """Captions for ``calibrate``, none of them in the evaluation set."""
    import numpy as np

    from .reference import evaluation_captions, sample_caption

    held_out = {c.text for c in evaluation_captions()}
    rng, texts = np.random.default_rng(CALIBRATION_SEED), []
    while len(texts) < NUM_CALIBRATION_CAPTIONS:
        text = sample_caption(rng).text
        if text not in held_out and text not in texts:
            texts.append(text)
    return texts


@dataclass(frozen=True)
class CaptionRun:
    """One caption: its motion class, the uncached video's motion and check, computed steps per variant."""

    caption: str
    speed: str
    motion: float  # mean |frame difference| of the uncached video, in [0, 1] pixel units
    baseline_ok: bool
    computed: dict[str, int]
    direction: str | None = None  # captioned direction (None: still)
    measured_direction: str | None = None  # of the uncached video by check_clip (None: still or missing)
    speed_px: float = float("nan")  # fitted object speed of the uncached video, pixels per frame
    jitter_px: float = float("nan")  # RMS residual of its constant-velocity fit
    metric: dict[str, float] = field(default_factory=dict)  # per variant: mean decision metric of its steps


def frame_motion(frames: torch.Tensor) -> float:
    """Mean absolute difference between consecutive frames of ``[T, C, H, W]``."""
    return float((frames[1:] - frames[:-1]).abs().mean())


def run_captions(pipe, captions, configs: dict, steps: int = 30, seed: int = 0, progress=print) -> list[CaptionRun]:
    """Generate each caption (a :class:`~adacache_fx.tools.reference.Caption`) uncached and with each config;
    caption ``i`` starts from the noise of seed ``seed + i`` (one shared noise would give every video the
    motion that noise leads to)."""
    import adacache_fx as ax

    from .reference import check_clip

    baseline = pipe.transformer
    cached = {v: ax.transform(baseline, config) for v, config in configs.items()}
    runs = []
    try:
        for i, caption in enumerate(captions):
            def generate(transformer, caption=caption, noise_seed=seed + i):
                pipe.transformer = transformer
                generator = torch.Generator().manual_seed(noise_seed)
                return pipe(caption.text, num_inference_steps=steps, generator=generator).frames[0]

            video = generate(baseline)
            computed, metric = {}, {}
            for v in configs:
                generate(cached[v])
                report = ax.report(cached[v], "cond")
                computed[v] = report.num_computed
                values = [m for m in report.column(report.columns[0]) if m is not None and m == m]
                metric[v] = statistics.fmean(values) if values else float("nan")
            check = check_clip(video.permute(1, 0, 2, 3) * 2 - 1, caption)
            runs.append(CaptionRun(caption.text, caption.speed, frame_motion(video), check.ok, computed,
                                   caption.direction, check.direction, check.speed_px, check.jitter_px, metric))
            progress(f"  [{i + 1}/{len(captions)}] {caption.text}: computed {computed}")
    finally:
        pipe.transformer = baseline
    return runs


def summarize(runs: list[CaptionRun]) -> dict[str, dict[str, float]]:
    """Per motion class: ``n``, median ``motion``, ``ok`` fraction and the median computed steps per variant."""
    table = {}
    for speed in SPEED_CLASSES:
        group = [r for r in runs if r.speed == speed]
        if not group:
            continue
        row = {"n": len(group), "motion": statistics.median(r.motion for r in group),
               "ok": sum(r.baseline_ok for r in group) / len(group)}
        for v in group[0].computed:
            row[v] = statistics.median(r.computed[v] for r in group)
        table[speed] = row
    return table


def format_table(table: dict[str, dict[str, float]], steps: int) -> str:
    variants = [k for k in next(iter(table.values())) if k not in ("n", "motion", "ok")]
    lines = ["| motion class | captions | uncached motion | uncached caption ok | "
             + " | ".join(f"{v}: median computed / {steps}" for v in variants) + " |",
             "|---" * (4 + len(variants)) + "|"]
    for speed, row in table.items():
        lines.append(f"| {speed} | {row['n']} | {row['motion']:.4f} | {row['ok']:.0%} | "
                     + " | ".join(f"{row[v]:g}" for v in variants) + " |")
    return "\n".join(lines)


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (NaN when either is constant)."""
    rx, ry = _ranks(list(x)), _ranks(list(y))
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else float("nan")


def follow_table(runs: list[CaptionRun]) -> str:
    """Markdown, a row per variant: does its schedule follow the video's motion? Spearman's rank correlation
    of computed steps with the uncached video's motion over all captions, and the median (over videos) of
    the mean decision metric the rule read, per motion class."""
    classes = [c for c in SPEED_CLASSES if any(r.speed == c for r in runs)]
    lines = ["| variant | rank correlation, computed steps vs motion | "
             + " | ".join(f"median metric, {c}" for c in classes) + " |", "|---" * (2 + len(classes)) + "|"]
    for v in runs[0].computed:
        rho = rank_correlation([r.motion for r in runs], [r.computed[v] for r in runs])
        medians = [statistics.median(r.metric.get(v, float("nan")) for r in runs if r.speed == c) for c in classes]
        lines.append(f"| {v} | {rho:+.2f} | " + " | ".join(f"{m:.4g}" for m in medians) + " |")
    return "\n".join(lines)


def direction_confusion(runs: list[CaptionRun]) -> str:
    """Markdown counts: captioned direction (rows) against the direction measured in the uncached video."""
    names = ("left", "right", "up", "down", None)
    label = {None: "still / none"}
    lines = ["| captioned \\ measured | " + " | ".join(label.get(n, n) for n in names)
             + " | median speed px/frame | median jitter px |", "|---" * (len(names) + 3) + "|"]
    for wanted in names:
        group = [r for r in runs if r.direction == wanted]
        if not group:
            continue
        counts = [sum(r.measured_direction == n for r in group) for n in names]
        lines.append(f"| {label.get(wanted, wanted)} | " + " | ".join(map(str, counts))
                     + f" | {statistics.median(r.speed_px for r in group):.2f}"
                     + f" | {statistics.median(r.jitter_px for r in group):.2f} |")
    return "\n".join(lines)


def plot(path: Path, runs: list[CaptionRun], steps: int) -> None:
    """Computed steps per caption against the uncached video's motion, one colour per motion class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(runs[0].computed)
    fig, axes = plt.subplots(1, len(variants), figsize=(4.5 * len(variants), 3.4), squeeze=False, sharey=True)
    colours = dict(zip(SPEED_CLASSES, ("tab:gray", "tab:blue", "tab:red")))
    for ax, v in zip(axes[0], variants):
        for speed in SPEED_CLASSES:
            group = [r for r in runs if r.speed == speed]
            ax.scatter([r.motion for r in group], [r.computed[v] for r in group], s=18, alpha=0.7,
                       color=colours[speed], label=speed)
        ax.set_title(v, fontsize=10)
        ax.set_xlabel("uncached video motion (mean |frame diff|)")
    axes[0, 0].set_ylabel(f"computed steps of {steps}")
    axes[0, 0].legend(title="caption", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cli_motion(args) -> int:
    from .reference import evaluation_captions
    from .reference.pipeline import ReferencePipeline

    torch.set_num_threads(args.threads)
    from .reference import weights_label

    pipe = ReferencePipeline.from_reference(args.weights)
    pipe.set_progress_bar_config(disable=True)
    captions = evaluation_captions(repeats=args.repeats)
    model = weights_label(args.weights, pipe.transformer)
    print(f"reference model {model}, {len(captions)} evaluation captions, {args.steps} steps, CFG 3.0, seeds "
          f"{args.seed}..{args.seed + len(captions) - 1} (one per caption)")
    import adacache_fx as ax

    codebook = ax.calibrate(pipe, calibration_captions(), args.steps, target="fast")
    print("calibrated codebook (target 'fast', on " f"{NUM_CALIBRATION_CAPTIONS} captions outside the evaluation set): "
          + ", ".join(f"{t:.3g}: {r}" for t, r in codebook.items()))
    runs = run_captions(pipe, captions, variants(args.steps, codebook), args.steps, args.seed)
    table = format_table(summarize(runs), args.steps) + "\n\nDoes the schedule follow motion?\n\n" + follow_table(runs)
    confusion = direction_confusion(runs)
    print(table + "\n\nDirection of the uncached videos (check_clip):\n\n" + confusion)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = f"adacache-fx motion --steps {args.steps} --repeats {args.repeats} --seed {args.seed}"
    command += f" --weights {args.weights}" if args.weights else ""
    (out / "motion_classes.md").write_text(
        f"`{command}`\n\nWeights: {model}.\n\n{table}\n\nDirection of the uncached videos (check_clip):\n\n{confusion}\n")
    plot(out / "motion_classes.png", runs, args.steps)
    print(f"\nwrote motion_classes.md and motion_classes.png to {out.resolve()}")
    return 0


def add_motion_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    parser.add_argument("--repeats", type=int, default=4,
                        help="evaluation set size / 12 (default 4: 48 captions, 16 per motion class)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default=None, help="folder of reference weights (default: bundled)")
    parser.add_argument("--out", default="adacache-fx-out", help="output folder")
    parser.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
