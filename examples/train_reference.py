"""Train (and export) the adacache_fx reference video DiT on synthetic captioned clips.

Rectified-flow / flow-matching objective as in Wan and Open-Sora 1.2: ``x_t = (1 - t) x0 + t noise``, the
transformer predicts the velocity ``noise - x0`` given ``x_t``, the timestep ``1000 t`` and the caption
embedding. ``t`` is drawn from a shifted logit-normal distribution: ``u = sigmoid(N(0, 1))`` (SD3 /
Open-Sora 1.2), then ``t = s u / (1 + (s - 1) u)`` with ``s = --t-shift`` (SD3's resolution shift). The shift
moves training towards high noise, where a clip's layout and motion are decided. 10% of captions are
dropped to ``""`` so that the model also learns the unconditional velocity for classifier-free guidance.
``--object-weight w`` weights the squared error of the pixels in and within 2 pixels of the object by
``1 + w`` (normalised by the total weight): the object covers 4-11% of a frame, so an unweighted loss spends
most of its signal on the background, and the shape words change only the few pixels along its edge.

The run is resumable in chunks: ``OUT/checkpoint.pt`` (model, EMA, optimizer, LR-schedule step, RNG states,
losses, caption-check history and the training hyper-parameters) is rewritten atomically every
``--save-minutes`` and when the process stops (end of ``--minutes``, SIGTERM, Ctrl-C). Every ``--eval-every``
steps the EMA model generates the fixed evaluation captions (``reference.data.evaluation_captions``) and
the caption check's pass rates are appended to ``OUT/eval.csv``; a copy of the checkpoint is kept as
``OUT/checkpoint_<step>.pt``.

Examples (from the repository root)::

    # fine-tune the bundled weights; 90 minutes now, the rest later
    python examples/train_reference.py --threads 1 --out runs/reference --steps 4500 \\
        --init adacache_fx/tools/reference/weights --minutes 90
    # next chunk (hyper-parameters come from the checkpoint)
    python examples/train_reference.py --threads 1 --out runs/reference \\
        --resume runs/reference/checkpoint.pt --minutes 90
    # a new model with 2x2 patches (2048 tokens, about 8x the time per step), in chunks
    python examples/train_reference.py --threads 1 --family hunyuan --patch-size 2 --out runs/ref-p2 --minutes 90
    # write the EMA weights, model card, loss curve, caption-check curve and sample grid
    python examples/train_reference.py --threads 1 --resume runs/reference/checkpoint.pt --export-only

``--export`` / ``--export-only`` write into ``--export-dir`` (default ``adacache_fx/tools/reference/weights/``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # no pyplot: renders headless with the Agg canvas

try:
    from adacache_fx.tools import reference as ref
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from adacache_fx.tools import reference as ref
from adacache_fx.tools.fixtures import euler_flow, flow_sigmas
from adacache_fx.tools.reference.data import BACKGROUND
from adacache_fx.tools.reference.model import FAMILIES

GRID_CAPTIONS = (
    "a large red circle moving right fast",
    "a small green square moving left slow",
    "a large blue triangle staying still",
    "a large yellow square moving up fast",
    "a small white circle moving down slow",
    "a large magenta triangle moving left fast",
    "a small red triangle staying still",
    "a large green circle moving down fast",
)
LOSS_EMA = 0.98
CHECK_KEYS = ("ok", "direction_ok", "speed_ok", "colour_ok", "size_ok", "shape_ok", "visible")
EVAL_COLUMNS = ("step", "train_min", "loss_ema", *CHECK_KEYS, "ok_still", "ok_slow", "ok_fast",
                "shape_ok_circle", "shape_ok_square", "shape_ok_triangle")
#: Training hyper-parameters; stored in the checkpoint and restored by --resume (--steps may be overridden).
HYPER = (
    "steps", "batch_size", "seed", "lr", "warmup", "weight_decay", "ema_decay", "caption_dropout", "t_shift",
    "init", "family", "single_layers", "patch_size", "object_weight", "shape_mix",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default 4500; on resume: kept)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("runs/reference"), help="run folder (checkpoints, logs)")
    p.add_argument("--resume", type=Path, default=None, metavar="CKPT", help="continue from this checkpoint")
    p.add_argument("--init", type=Path, default=None, metavar="DIR", help="start from these exported weights")
    p.add_argument("--minutes", type=float, default=None, help="stop (and checkpoint) after this many minutes")
    p.add_argument("--save-minutes", type=float, default=5.0, help="checkpoint interval in minutes")
    p.add_argument("--eval-every", type=int, default=400, help="caption-check interval in steps (0: never)")
    p.add_argument("--log-every", type=int, default=25, help="log line interval in steps")
    p.add_argument("--export", action="store_true", help="after training, write the shipped weights")
    p.add_argument("--export-only", action="store_true", help="export from --resume without training")
    p.add_argument("--eval-only", action="store_true",
                   help="print the caption check of the --resume (EMA) or --init weights at --guidance-scale / "
                        "--sample-steps, without training")
    p.add_argument("--export-dir", type=Path, default=ref.WEIGHTS_DIR, help="where --export writes")
    p.add_argument("--family", choices=("wan", "hunyuan"), default=None,
                   help="transformer class (default wan; hunyuan adds the pooled caption to the modulation)")
    p.add_argument("--single-layers", type=int, default=None, metavar="N",
                   help="hunyuan: single-stream blocks (default 4); above --init's count, the extra blocks are "
                        "appended as identities (zero output projection)")
    p.add_argument("--patch-size", type=int, default=None, metavar="P",
                   help="spatial patch size of a new model (default: the family's 4, or that of the --init weights; "
                        "2 gives 4x the tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then cosine decay to 10%%")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the exported weight EMA")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--t-shift", type=float, default=2.5, help="shift of the logit-normal t (1: none)")
    p.add_argument("--object-weight", type=float, default=0.0, metavar="W",
                   help="extra loss weight of the pixels in and near the object (0: plain MSE)")
    p.add_argument("--shape-mix", type=shape_mix_arg, default=None, metavar="C,S,T",
                   help="relative training frequencies of circle, square, triangle (default: uniform)")
    p.add_argument("--sample-steps", type=int, default=30, help="Euler steps for samples and evaluation")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="CFG scale for samples and evaluation")
    p.add_argument("--eval-repeats", type=int, default=4, help="evaluation set size / 12 (4: 48 captions)")
    args = p.parse_args(argv)
    if args.export_only and args.resume is None:
        p.error("--export-only needs --resume CKPT")
    if args.eval_only and args.resume is None and args.init is None:
        p.error("--eval-only needs --resume CKPT or --init DIR")
    return args


def shape_mix_arg(text: str) -> list[float]:
    """``--shape-mix C,S,T``: one non-negative weight per shape (circle, square, triangle)."""
    try:
        mix = [float(v) for v in text.split(",")]
        ref.data.shape_probabilities(mix)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return mix


def _mix_text(mix) -> str:
    return ", ".join(f"{shape} {p:.0%}" for shape, p in zip(ref.SHAPES, ref.data.shape_probabilities(mix), strict=True))


def init_defaults(args: argparse.Namespace) -> dict:
    """``family``, ``single_layers`` and ``patch_size`` of a new run: as given, else those of the ``--init``
    weights. Weights of another patch size cannot initialise the model (patch embedding and output projection
    change shape): that is an error, not a partial load."""
    config = json.loads((Path(args.init) / "config.json").read_text()) if args.init else {}
    family = args.family or config.get("family", "wan")
    single = args.single_layers or config.get("transformer", {}).get("num_single_layers")
    patch = spatial_patch(config.get("transformer", {}).get("patch_size"))
    if args.patch_size and patch and args.patch_size != patch:
        raise SystemExit(f"--patch-size {args.patch_size} does not fit the --init weights in {args.init} "
                         f"(patch size {patch}); train a new patch size from scratch (no --init)")
    return {"family": family, "single_layers": single, "patch_size": args.patch_size or patch}


def spatial_patch(patch, size: int | None = None):
    """The spatial patch size of a family's ``patch_size`` setting (an int, or Wan's ``(t, h, w)``); with
    ``size``: that setting with its spatial size replaced."""
    if size is None:
        return patch[-1] if isinstance(patch, list | tuple) else patch
    return (*patch[:-2], size, size) if isinstance(patch, list | tuple) else size


def sample_t(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Shifted logit-normal noise levels in (0, 1): ``s u / (1 + (s - 1) u)``, ``u = sigmoid(N(0, 1))``."""
    u = torch.sigmoid(torch.randn(batch, generator=generator))
    return shift * u / (1 + (shift - 1) * u)


def object_weights(clips: torch.Tensor, extra: float, reach: int = 2) -> torch.Tensor:
    """Per-pixel loss weights ``[B, 1, T, H, W]``: ``1 + extra`` in and within ``reach`` pixels of the object."""
    inside = ((clips - BACKGROUND).abs().amax(dim=1, keepdim=True) > 0.05).float()
    near = F.max_pool3d(inside, (1, 2 * reach + 1, 2 * reach + 1), stride=1, padding=(0, reach, reach))
    return 1.0 + extra * near


def flow_loss(pred: torch.Tensor, target: torch.Tensor, clips: torch.Tensor, extra: float) -> torch.Tensor:
    """MSE of the velocity; with ``extra > 0`` weighted towards the object (``object_weights``)."""
    if not extra:
        return F.mse_loss(pred, target)
    w = object_weights(clips, extra).expand_as(pred)
    return (w * (pred - target) ** 2).sum() / w.sum()


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def grow_into(transformer: torch.nn.Module, source: torch.nn.Module) -> int | None:
    """Load ``source``'s weights into ``transformer``, which may have more single-stream blocks (HunyuanVideo's
    ``single_transformer_blocks``): those are appended as identities (``proj_out`` zeroed, so each adds a zero
    residual and the grown model computes exactly what ``source`` did). Returns ``source``'s block count when
    it grew, else None."""
    have = len(getattr(source, "single_transformer_blocks", ()))
    want = len(getattr(transformer, "single_transformer_blocks", ()))
    if want < have:
        raise ValueError(f"--single-layers {want} is fewer than the {have} blocks of the --init weights")
    missing, unexpected = transformer.load_state_dict(source.state_dict(), strict=False)
    new = tuple(f"single_transformer_blocks.{i}." for i in range(have, want))
    stray = [k for k in missing if not k.startswith(new)] + list(unexpected)
    if stray:
        raise ValueError(f"--init weights do not fit the model: {stray[:4]}")
    with torch.no_grad():
        for block in transformer.single_transformer_blocks[have:want] if want > have else ():
            block.proj_out.weight.zero_()
            block.proj_out.bias.zero_()
    return have if want > have else None


def save_atomic(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def plot_losses(losses: list[float], path: Path) -> None:
    smooth, acc = [], None
    for v in losses:
        acc = v if acc is None else LOSS_EMA * acc + (1 - LOSS_EMA) * v
        smooth.append(acc)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.7, label="loss")
    ax.plot(steps, smooth, color="tab:blue", label=f"EMA ({LOSS_EMA})")
    ax.set(xlabel="step", ylabel="flow-matching MSE", yscale="log", title="reference model training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_checks(history: list[dict], path: Path) -> None:
    """Caption-check pass rates of the evaluation set against the training step."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    steps = [row["step"] for row in history]
    for key in ("ok", "direction_ok", "speed_ok", "shape_ok", "colour_ok"):
        ax.plot(steps, [row[key] for row in history], marker="o", markersize=3, label=key)
    ax.set(xlabel="step", ylabel="pass rate", ylim=(0, 1.02), title="caption check (evaluation set, EMA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def to_image(frame: torch.Tensor) -> np.ndarray:
    return ((frame.permute(1, 2, 0).clamp(-1, 1) + 1) / 2).numpy()


def plot_grid(clips: torch.Tensor, captions: list[str], path: Path) -> None:
    """First, middle and last frame of each clip, one row per caption."""
    t_len = clips.shape[2]
    frames = (0, t_len // 2, t_len - 1)
    fig = Figure(figsize=(4.2, 1.55 * len(captions)))
    axes = fig.subplots(len(captions), len(frames), squeeze=False)
    for row, (clip, caption) in enumerate(zip(clips, captions, strict=True)):
        for col, f in enumerate(frames):
            ax = axes[row, col]
            ax.imshow(to_image(clip[:, f]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == len(captions) - 1:
                ax.set_xlabel(f"frame {f}", fontsize=7)
        axes[row, 0].set_title(caption, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


@torch.no_grad()
def sample(transformer, caption_encoder, captions: list, num_steps: int, guidance_scale: float, seed: int):
    """Clips ``[B, 3, 8, 32, 32]`` in [-1, 1]: Euler from noise (sigma 1) to 0, classifier-free guidance as one
    batch of conditional and unconditional (empty caption) inputs; ``guidance_scale = 1``: conditional only."""
    device = next(transformer.parameters()).device
    use_cfg = guidance_scale != 1.0
    texts = [c.text if isinstance(c, ref.Caption) else c for c in captions]
    text = caption_encoder.encode_conditioning(texts + [""] * len(texts) if use_cfg else texts)
    shape = (len(captions), ref.data.CHANNELS, ref.data.NUM_FRAMES, ref.data.HEIGHT, ref.data.WIDTH)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)

    def velocity(x, sigma, _):
        batch = torch.cat([x, x]) if use_cfg else x
        v = transformer(batch, torch.full((batch.shape[0],), float(sigma) * 1000.0, device=device), **text,
                        return_dict=False)[0]
        if not use_cfg:
            return v
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return euler_flow(velocity, noise, flow_sigmas(num_steps).to(device)).clamp(-1.0, 1.0)


def evaluate(transformer, caption_encoder, args: argparse.Namespace) -> dict[str, float]:
    """Generate the fixed evaluation captions (seed = index of the chunk of 16) and score them."""
    captions = ref.evaluation_captions(args.eval_repeats)
    was_training = transformer.training
    transformer.eval()
    clips = [
        sample(transformer, caption_encoder, captions[i : i + 16], args.sample_steps, args.guidance_scale, i)
        for i in range(0, len(captions), 16)
    ]
    transformer.train(was_training)
    results = [ref.check_clip(c, cap) for c, cap in zip(torch.cat(clips), captions, strict=True)]
    rates = ref.check_rates(results)  # checked once, above
    for speed in ref.SPEEDS:
        rates[f"ok_{speed}"] = float(np.mean([r.ok for r in results if r.caption.speed == speed]))
    for shape in ref.SHAPES:
        rates[f"shape_ok_{shape}"] = float(np.mean([r.shape_ok for r in results if r.caption.shape == shape]))
    return rates


def write_eval_csv(history: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, EVAL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


class Run:
    """Model, EMA, optimizer, schedule, RNG streams and logs of one training run (one checkpoint)."""

    def __init__(self, hyper: dict) -> None:
        self.hyper = hyper
        torch.manual_seed(hyper["seed"])
        family = hyper.get("family") or "wan"
        single = hyper.get("single_layers")
        overrides = {"num_single_layers": single} if single else {}
        if hyper.get("patch_size"):
            overrides["patch_size"] = spatial_patch(FAMILIES[family][1]["patch_size"], hyper["patch_size"])
        self.transformer, self.encoder = ref.build_reference_model(family, **overrides)
        self.init_info: dict = {}
        self.grown_from: int | None = None
        if hyper["init"]:
            t_init, e_init = ref.load_reference_model(hyper["init"])
            self.grown_from = grow_into(self.transformer, t_init)
            self.encoder.load_state_dict(e_init.state_dict())
            config = json.loads((Path(hyper["init"]) / "config.json").read_text())
            self.init_info = config.get("training", {})
        self.ema_t = copy.deepcopy(self.transformer).requires_grad_(False)
        self.ema_e = copy.deepcopy(self.encoder).requires_grad_(False)
        self.params = [p for m in (self.transformer, self.encoder) for p in m.parameters()]
        self.ema_params = [p for m in (self.ema_t, self.ema_e) for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=hyper["lr"], weight_decay=hyper["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.hyper["warmup"], self.hyper["steps"])
        )
        self.data_rng = np.random.default_rng(hyper["seed"])
        self.gen = torch.Generator().manual_seed(hyper["seed"] + 1)
        self.step, self.losses, self.ema_loss = 0, [], float("nan")
        self.train_s = self.eval_s = 0.0
        self.cpu_s_before = 0.0  # process CPU time of earlier chunks; this process adds time.process_time()
        self.history: list[dict] = []

    def state(self) -> dict:
        return {
            "hyper": json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in self.hyper.items()}),
            "init_info": json.dumps(self.init_info),
            "grown_from": json.dumps(self.grown_from),
            "step": self.step,
            "transformer": self.transformer.state_dict(),
            "caption_encoder": self.encoder.state_dict(),
            "ema_transformer": self.ema_t.state_dict(),
            "ema_caption_encoder": self.ema_e.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_rng": json.dumps(self.data_rng.bit_generator.state),
            "torch_rng": self.gen.get_state(),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "ema_loss": self.ema_loss,
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "cpu_s": self.cpu_s,
            "history": json.dumps(self.history),
        }

    @classmethod
    def from_checkpoint(cls, path: Path, steps: int | None) -> Run:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        hyper = json.loads(ckpt["hyper"]) | ({"steps": steps} if steps else {})
        hyper["init"] = None  # the checkpoint replaces the initial weights
        run = cls(hyper)
        run.hyper["init"] = json.loads(ckpt["hyper"])["init"]
        run.init_info = json.loads(ckpt["init_info"])
        run.grown_from = json.loads(ckpt.get("grown_from", "null"))
        run.transformer.load_state_dict(ckpt["transformer"])
        run.encoder.load_state_dict(ckpt["caption_encoder"])
        run.ema_t.load_state_dict(ckpt["ema_transformer"])
        run.ema_e.load_state_dict(ckpt["ema_caption_encoder"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        run.data_rng.bit_generator.state = json.loads(ckpt["data_rng"])
        run.gen.set_state(ckpt["torch_rng"])
        run.step, run.ema_loss = ckpt["step"], ckpt["ema_loss"]
        run.train_s, run.eval_s = ckpt["train_s"], ckpt["eval_s"]
        # checkpoints written before CPU time was recorded: wall time bounds a 1-thread process's CPU time
        run.cpu_s_before = ckpt.get("cpu_s", run.train_s + run.eval_s)
        run.losses = ckpt["losses"].tolist()
        run.history = json.loads(ckpt["history"])
        return run

    @property
    def cpu_s(self) -> float:
        """CPU seconds of all chunks so far (all threads; model building and evaluation included)."""
        return self.cpu_s_before + time.process_time()

    def train_step(self) -> tuple[float, float]:
        h = self.hyper
        clips, captions = ref.sample_batch(self.data_rng, h["batch_size"], h.get("shape_mix"))
        drop = torch.rand(h["batch_size"], generator=self.gen) < h["caption_dropout"]
        texts = ["" if d else c.text for c, d in zip(captions, drop.tolist(), strict=True)]
        noise = torch.randn(clips.shape, generator=self.gen)
        t = sample_t(h["batch_size"], h["t_shift"], self.gen)
        tb = t.view(-1, 1, 1, 1, 1)
        x_t = (1 - tb) * clips + tb * noise
        context = self.encoder.conditioning(ref.encode_captions(texts))
        pred = self.transformer(x_t, t * 1000.0, **context, return_dict=False)[0]
        loss = flow_loss(pred, noise - clips, clips, h.get("object_weight", 0.0))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        decay = min(h["ema_decay"], (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.params], 1.0 - decay)
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        self.ema_loss = value if math.isnan(self.ema_loss) else LOSS_EMA * self.ema_loss + (1 - LOSS_EMA) * value
        return value, float(grad_norm)

    def evaluate(self, args: argparse.Namespace) -> dict:
        start = time.perf_counter()
        rates = evaluate(self.ema_t, self.ema_e, args)
        self.eval_s += time.perf_counter() - start
        row = {"step": self.step, "train_min": round(self.train_s / 60, 2), "loss_ema": self.ema_loss}
        row |= {k: round(v, 4) for k, v in rates.items()}
        self.history = [r for r in self.history if r["step"] != self.step] + [row]
        return row


def _lineage(info: dict | None) -> list[dict]:
    """The training stages behind an ``--init`` (its ``training`` record and theirs), earliest first."""
    stages = []
    while info:
        stages.insert(0, info)
        info = info.get("init_training")
    return stages


def export(run: Run, args: argparse.Namespace) -> None:
    """EMA weights (safetensors), config, model card, loss curve, caption-check curve and sample grid."""
    folder: Path = args.export_dir
    h = run.hyper
    ema_t, ema_e = run.ema_t.eval(), run.ema_e.eval()
    if not run.history or run.history[-1]["step"] != run.step:
        print(f"evaluating step {run.step} ...", flush=True)
        run.evaluate(args)
    result = run.history[-1]
    prior_steps = int(run.init_info.get("steps", 0))
    training = {
        "steps": prior_steps + run.step,
        "steps_this_run": run.step,
        "init": str(h["init"]) if h["init"] else None,
        "init_training": run.init_info or None,
        "batch_size": h["batch_size"],
        "lr": h["lr"],
        "warmup": h["warmup"],
        "ema_decay": h["ema_decay"],
        "caption_dropout": h["caption_dropout"],
        "t_shift": h["t_shift"],
        "object_weight": h.get("object_weight", 0.0),
        "shape_mix": h.get("shape_mix"),
        "seed": h["seed"],
        "grown_from_single_layers": run.grown_from,
        "final_loss_ema": run.ema_loss,
        "training_time_s": round(run.train_s, 1),
        "evaluation_time_s": round(run.eval_s, 1),
        "cpu_time_s": round(run.cpu_s, 1),
        "objective": "rectified flow, x_t = (1-t) x0 + t noise, v = noise - x0, timestep = 1000 t",
        "t_sampling": f"shifted logit-normal: u = sigmoid(N(0, 1)), t = s u / (1 + (s - 1) u), s = {h['t_shift']}",
    }
    sampling = {"num_steps": args.sample_steps, "guidance_scale": args.guidance_scale}
    extra = {"training": training, "sampling": sampling, "caption_check": result}
    ref.save_reference_model(ema_t, ema_e, folder, extra_config=extra)
    plot_losses(run.losses, folder / "loss_curve.png")
    plot_checks(run.history, folder / "caption_check.png")
    print("sampling the export grid ...", flush=True)
    grid = sample(ema_t, ema_e, list(GRID_CAPTIONS), args.sample_steps, args.guidance_scale, seed=0)
    plot_grid(grid, list(GRID_CAPTIONS), folder / "samples.png")
    n_params = sum(p.numel() for p in ema_t.parameters())
    n_enc = sum(p.numel() for p in ema_e.parameters())
    check_rows = "\n".join(f"| {k} | {result[k]:.2f} |" for k in (*CHECK_KEYS, "ok_still", "ok_slow", "ok_fast"))
    curve_rows = "\n".join(
        f"| {r['step']} | {r['train_min']:.0f} | {r['ok']:.2f} | {r['direction_ok']:.2f} | {r['speed_ok']:.2f} "
        f"| {r['shape_ok']:.2f} |"
        for r in run.history
    )
    config_json = json.dumps(json.loads((folder / "config.json").read_text())["transformer"], indent=2)
    grown = (f", grown from {run.grown_from} to {len(ema_t.single_transformer_blocks)} single-stream blocks "
             "(the new ones appended as identities)") if run.grown_from else ""
    if prior_steps:
        stages = ", then ".join(
            f"{st.get('steps_this_run', st.get('steps'))} steps ({st.get('training_time_s', 0.0) / 60:.0f} min, lr "
            f"{st.get('lr')}, t shift {st.get('t_shift', 1.0)}"
            + (f", object weight {st['object_weight']}" if st.get("object_weight") else "")
            + (f", shape mix {_mix_text(st['shape_mix'])}" if st.get("shape_mix") else "") + ")"
            for st in _lineage(run.init_info))
        origin = f"{stages} in earlier runs, then {run.step} steps fine-tuning from those weights{grown} (this run, below)"
    elif h["init"]:
        origin = f"{run.step} steps from the weights in `{h['init']}` (no training record){grown}"
    else:
        origin = f"{run.step} steps from scratch"
    n_eval = len(ref.evaluation_captions(args.eval_repeats))
    ps = spatial_patch(ema_t.config.patch_size)
    w = h.get("object_weight", 0.0)
    weighting = (f"; squared error weighted `1 + {w}` in and within 2 pixels of the object, normalised by the "
                 "total weight") if w else ""
    mix = (f" This run drew the shapes {_mix_text(h['shape_mix'])} (uniform otherwise)."
           if h.get("shape_mix") else "")
    blocks = ref.describe_reference_model(ema_t).split(", ", 1)[1]  # "2 + 8 single-stream blocks"
    pooled = " and the pooled caption in the timestep modulation" if run.hyper.get("family") == "hunyuan" else ""
    card = f"""# adacache_fx reference video DiT

A tiny text-to-video diffusion transformer (diffusers `{type(ema_t).__name__}`, pixel space{pooled}) trained
from scratch on synthetic clips, shipped so that AdaCache and the other passes of `adacache_fx` can be tested on
a real (if small) trained model. Load it with `adacache_fx.tools.reference.load_reference_model()`.

## Model

- Transformer: {n_params / 1e6:.2f} M parameters, {blocks}, hidden
  {ema_t.config.num_attention_heads * ema_t.config.attention_head_dim}; input `[B, 3, 8, 32, 32]` in [-1, 1]
  is patchified 1x{ps}x{ps} into {8 * (32 // ps) ** 2} tokens.
- Caption encoder: {n_enc / 1e3:.1f} k parameters; word embeddings + learned positions,
  `[B, 8] -> [B, 8, 64]`, padding positions zeroed (the empty caption `""` is the unconditional input).
- Weights: exponential moving average (decay {h["ema_decay"]}) of the trained weights, safetensors.

```json
{config_json}
```

## Data

Generated on the fly by `adacache_fx.tools.reference.data` (no downloads): 8 frames of 32x32 RGB, one anti-aliased
object on a dark background. Shape in {{circle, square, triangle}}, colour in {{{", ".join(ref.COLOURS)}}},
size in {{small, large}}, and either static or moving left/right/up/down at 1 (slow) or 3 (fast) pixels per
frame. Captions: "a large red circle moving left fast", "a small blue square staying still".{mix}

## Training

- Objective: rectified flow / flow matching, `x_t = (1 - t) x0 + t noise`, target `noise - x0`, timestep
  `1000 t`; `t = s u / (1 + (s - 1) u)`, `u ~ sigmoid(N(0, 1))`, shift `s = {h["t_shift"]}`{weighting}.
- {prior_steps + run.step} steps in all: {origin}.
- This run: batch {h["batch_size"]}, AdamW (lr {h["lr"]}, weight decay {h["weight_decay"]}),
  {h["warmup"]}-step warmup then cosine decay to 10% at step {h["steps"]}, grad-norm clip 1.0,
  {h["caption_dropout"]:.0%} caption dropout, seed {h["seed"]}; resumable in chunks
  (`examples/train_reference.py --resume`).
- Final loss (EMA {LOSS_EMA} of the per-step loss): **{run.ema_loss:.4f}**.
- Time of this run: {run.train_s / 60:.1f} min training + {run.eval_s / 60:.1f} min periodic evaluation (wall),
  {run.cpu_s / 3600:.2f} CPU-hours in all, on CPU ({platform.processor() or platform.machine()}),
  torch {torch.__version__}.

![loss curve](loss_curve.png)

## Samples

Euler sampler (`examples/train_reference.py`: `sample`, on `adacache_fx.tools.fixtures.euler_flow`), {args.sample_steps} steps, guidance scale
{args.guidance_scale}, seed 0. First, middle and last frame per caption:

![samples](samples.png)

## Caption faithfulness

`adacache_fx.tools.reference.check_clip` locates the object in every frame and measures motion direction, speed,
colour, size and shape (it scores 100% on rendered ground-truth clips). Pass rates of the uncached model over
the {n_eval} fixed evaluation captions (`reference.evaluation_captions()`: every direction x speed
pair equally often, a third still; same sampler settings; `ok` = direction, speed and colour all right;
`ok_<speed>` = `ok` within one speed class) at step {run.step}:

| check | rate |
| --- | --- |
{check_rows}

Learning curve (EMA weights, same evaluation):

| step | training min | ok | direction | speed | shape |
| --- | --- | --- | --- | --- | --- |
{curve_rows}

![caption check](caption_check.png)
"""
    (folder / "README.md").write_text(card)
    print(f"exported to {folder}: " + json.dumps(result), flush=True)


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume is not None:
        run = Run.from_checkpoint(args.resume, args.steps)
        print(f"resumed from {args.resume} at step {run.step} (loss EMA {run.ema_loss:.4f})", flush=True)
    else:
        hyper = {k: getattr(args, k) for k in HYPER} | {"steps": args.steps or 4500} | init_defaults(args)
        run = Run(hyper)
    if args.export_only:
        export(run, args)
        return
    if args.eval_only:
        rates = evaluate(run.ema_t, run.ema_e, args)
        print(json.dumps({"guidance_scale": args.guidance_scale, "sample_steps": args.sample_steps}
                         | {k: round(v, 4) for k, v in rates.items()}), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "checkpoint.pt"
    total = run.hyper["steps"]

    def checkpoint(keep: bool = False) -> None:
        save_atomic(ckpt_path, run.state())
        if keep:
            shutil.copyfile(ckpt_path, args.out / f"checkpoint_{run.step:05d}.pt")
        if run.losses:
            plot_losses(run.losses, args.out / "loss_curve.png")

    def maybe_evaluate() -> None:
        if args.eval_every and run.step % args.eval_every == 0 and run.step not in {r["step"] for r in run.history}:
            row = run.evaluate(args)
            print("eval " + json.dumps(row), flush=True)
            write_eval_csv(run.history, args.out / "eval.csv")
            plot_checks(run.history, args.out / "caption_check.png")
            checkpoint(keep=True)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    run.transformer.train()
    run.encoder.train()
    chunk_start = time.perf_counter()
    last_save = chunk_start
    try:
        maybe_evaluate()
        while run.step < total:
            if args.minutes is not None and time.perf_counter() - chunk_start > 60 * args.minutes:
                print(f"--minutes {args.minutes} reached at step {run.step}", flush=True)
                break
            t0 = time.perf_counter()
            loss, grad_norm = run.train_step()
            run.train_s += time.perf_counter() - t0
            if run.step % args.log_every == 0 or run.step == total:
                rate = run.train_s / max(1, len(run.losses))
                print(
                    f"step {run.step}/{total} loss {loss:.4f} ema {run.ema_loss:.4f} grad {grad_norm:.3f} "
                    f"lr {run.scheduler.get_last_lr()[0]:.2e} {rate:.2f} s/step "
                    f"train {run.train_s / 60:.1f} min eval {run.eval_s / 60:.1f} min cpu {run.cpu_s / 60:.1f} min",
                    flush=True,
                )
            maybe_evaluate()
            if time.perf_counter() - last_save > 60 * args.save_minutes:
                checkpoint()
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        checkpoint()
        print(f"interrupted: saved {ckpt_path} at step {run.step}", flush=True)
        raise SystemExit(130) from None
    checkpoint()
    print(f"saved {ckpt_path}: step {run.step}/{total}, loss EMA {run.ema_loss:.4f}", flush=True)
    if args.export and run.step >= total:
        export(run, args)


if __name__ == "__main__":
    main()
