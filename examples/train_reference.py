"""Train (and export) the adacache_fx reference video DiT on synthetic captioned clips.

Rectified-flow / flow-matching objective as in Wan and Open-Sora 1.2: ``x_t = (1 - t) x0 + t noise``, the
transformer predicts the velocity ``noise - x0`` given ``x_t``, the timestep ``1000 t`` and the caption
embedding. ``t`` is drawn from a logit-normal distribution (``sigmoid(N(0, 1))``, as in SD3 / Open-Sora 1.2),
which concentrates training on mid-range noise levels. 10% of captions are dropped to ``""`` so that the
model also learns the unconditional velocity for classifier-free guidance.

Examples (from the repository root)::

    python examples/train_reference.py --threads 1 --out runs/reference --steps 3000
    python examples/train_reference.py --threads 1 --out runs/reference --steps 3000 --resume
    python examples/train_reference.py --threads 1 --out runs/reference --steps 3000 --resume --export

``--out`` holds ``checkpoint.pt`` (model, EMA, optimizer and RNG state; local only) and ``loss_curve.png``.
``--export`` writes the EMA weights as safetensors, ``config.json``, a model card ``README.md``, the loss
curve and a sample grid into ``adacache_fx/tools/reference/weights/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # no pyplot: renders headless with the Agg canvas
from tqdm import tqdm

try:
    from adacache_fx.tools import reference as ref
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from adacache_fx.tools import reference as ref
from adacache_fx.tools.fixtures import euler_flow, flow_sigmas

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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="total optimizer steps (including resumed ones)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("runs/reference"), help="run folder (checkpoint, plots)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint interval in steps")
    p.add_argument("--log-every", type=int, default=25, help="plain log line interval in steps")
    p.add_argument("--export", action="store_true", help="after training, write the shipped weights")
    p.add_argument("--export-dir", type=Path, default=ref.WEIGHTS_DIR, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then cosine decay to 10%%")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the exported weight EMA")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--sample-steps", type=int, default=30, help="Euler steps for the export samples")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="CFG scale for the export samples")
    p.add_argument("--eval-clips", type=int, default=48, help="generated clips scored by checks at export")
    return p.parse_args()


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
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
def sample(transformer, caption_encoder, captions: list[str], num_steps: int, guidance_scale: float, seed: int):
    """Clips ``[B, 3, 8, 32, 32]`` in [-1, 1]: Euler from noise (sigma 1) to 0, classifier-free guidance as one
    batch of conditional and unconditional (empty caption) inputs; ``guidance_scale = 1``: conditional only."""
    device = next(transformer.parameters()).device
    use_cfg = guidance_scale != 1.0
    text = caption_encoder.encode(captions + [""] * len(captions) if use_cfg else captions).to(device)
    shape = (len(captions), ref.data.CHANNELS, ref.data.NUM_FRAMES, ref.data.HEIGHT, ref.data.WIDTH)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)

    def velocity(x, sigma, _):
        batch = torch.cat([x, x]) if use_cfg else x
        v = transformer(batch, torch.full((batch.shape[0],), float(sigma) * 1000.0, device=device), text,
                        return_dict=False)[0]
        if not use_cfg:
            return v
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return euler_flow(velocity, noise, flow_sigmas(num_steps).to(device)).clamp(-1.0, 1.0)


def evaluate(transformer, caption_encoder, args: argparse.Namespace) -> dict[str, float]:
    """Generate ``--eval-clips`` clips for random captions and score them with ``checks``."""
    rng = np.random.default_rng(12345)
    captions = [ref.sample_caption(rng) for _ in range(args.eval_clips)]
    clips = []
    for i in range(0, len(captions), 16):
        chunk = captions[i : i + 16]
        clips.append(
            sample(transformer, caption_encoder, chunk, args.sample_steps, args.guidance_scale, i)
        )
    return ref.check_clips(torch.cat(clips), captions)


def export(
    ema_t, ema_e, losses: list[float], ema_loss: float, elapsed: float, args: argparse.Namespace
) -> None:
    folder: Path = args.export_dir
    step = len(losses)
    training = {
        "steps": step,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "ema_decay": args.ema_decay,
        "caption_dropout": args.caption_dropout,
        "seed": args.seed,
        "final_loss_ema": ema_loss,
        "training_time_s": round(elapsed, 1),
        "objective": "rectified flow, x_t = (1-t) x0 + t noise, v = noise - x0, timestep = 1000 t",
        "t_sampling": "logit-normal: sigmoid(N(0, 1))",
    }
    sampling = {"num_steps": args.sample_steps, "guidance_scale": args.guidance_scale}
    ref.save_reference_model(ema_t, ema_e, folder, extra_config={"training": training, "sampling": sampling})
    plot_losses(losses, folder / "loss_curve.png")
    print("sampling the export grid ...", flush=True)
    grid = sample(ema_t, ema_e, list(GRID_CAPTIONS), args.sample_steps, args.guidance_scale, seed=0)
    plot_grid(grid, list(GRID_CAPTIONS), folder / "samples.png")
    rates = evaluate(ema_t, ema_e, args) if args.eval_clips > 0 else {}
    n_params = sum(p.numel() for p in ema_t.parameters())
    n_enc = sum(p.numel() for p in ema_e.parameters())
    check_rows = "\n".join(f"| {k} | {v:.2f} |" for k, v in rates.items())
    config_json = json.dumps(json.loads((folder / "config.json").read_text())["transformer"], indent=2)
    card = f"""# adacache_fx reference video DiT

A tiny text-to-video diffusion transformer (diffusers `WanTransformer3DModel`, pixel space) trained from
scratch on synthetic clips, shipped so that AdaCache and the other passes of `adacache_fx` can be tested on a
real (if small) trained model. Load it with `adacache_fx.tools.reference.load_reference_model()`.

## Model

- Transformer: {n_params / 1e6:.2f} M parameters, {ema_t.config.num_layers} blocks, hidden
  {ema_t.config.num_attention_heads * ema_t.config.attention_head_dim}; input `[B, 3, 8, 32, 32]` in [-1, 1]
  is patchified 1x4x4 into 512 tokens.
- Caption encoder: {n_enc / 1e3:.1f} k parameters; word embeddings + learned positions,
  `[B, 8] -> [B, 8, 64]`, padding positions zeroed (the empty caption `""` is the unconditional input).
- Weights: exponential moving average (decay {args.ema_decay}) of the trained weights, safetensors.

```json
{config_json}
```

## Data

Generated on the fly by `adacache_fx.tools.reference.data` (no downloads): 8 frames of 32x32 RGB, one anti-aliased
object on a dark background. Shape in {{circle, square, triangle}}, colour in {{{", ".join(ref.COLOURS)}}},
size in {{small, large}}, and either static or moving left/right/up/down at 1 (slow) or 3 (fast) pixels per
frame. Captions: "a large red circle moving left fast", "a small blue square staying still".

## Training

- Objective: rectified flow / flow matching, `x_t = (1 - t) x0 + t noise`, target `noise - x0`, timestep
  `1000 t`; `t ~ sigmoid(N(0, 1))` (logit-normal).
- {step} steps, batch {args.batch_size}, AdamW (lr {args.lr}, weight decay {args.weight_decay}),
  {args.warmup}-step warmup then cosine decay to 10%, grad-norm clip 1.0,
  {args.caption_dropout:.0%} caption dropout, seed {args.seed}.
- Final loss (EMA {LOSS_EMA} of the per-step loss): **{ema_loss:.4f}**.
- Training time: {elapsed / 60:.1f} min on CPU ({args.threads or torch.get_num_threads()} thread(s),
  {platform.processor() or platform.machine()}), torch {torch.__version__}.

![loss curve](loss_curve.png)

## Samples

Euler sampler (`examples/train_reference.py`: `sample`, on `adacache_fx.tools.fixtures.euler_flow`), {args.sample_steps} steps, guidance scale
{args.guidance_scale}, seed 0. First, middle and last frame per caption:

![samples](samples.png)

## Caption faithfulness

`adacache_fx.tools.reference.check_clip` locates the object in every frame and measures motion direction, speed,
colour, size and shape (it scores 100% on rendered ground-truth clips). Pass rates over {args.eval_clips}
generated clips for random captions (same sampler settings; `ok` = direction, speed and colour all right):

| check | rate |
| --- | --- |
{check_rows}
"""
    (folder / "README.md").write_text(card)
    print(f"exported to {folder}: " + json.dumps(rates), flush=True)


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "checkpoint.pt"
    torch.manual_seed(args.seed)

    transformer, encoder = ref.build_reference_model()
    ema_t, ema_e = (
        copy.deepcopy(transformer).requires_grad_(False),
        copy.deepcopy(encoder).requires_grad_(False),
    )
    params = [p for m in (transformer, encoder) for p in m.parameters()]
    ema_params = [p for m in (ema_t, ema_e) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup, args.steps))
    data_rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, losses, ema_loss, elapsed = 0, [], float("nan"), 0.0

    if args.resume:
        if not ckpt_path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        for module, key in ((transformer, "transformer"), (encoder, "caption_encoder")):
            module.load_state_dict(ckpt[key])
        ema_t.load_state_dict(ckpt["ema_transformer"])
        ema_e.load_state_dict(ckpt["ema_caption_encoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        data_rng.bit_generator.state = json.loads(ckpt["data_rng"])
        gen.set_state(ckpt["torch_rng"])
        step, ema_loss, elapsed = ckpt["step"], ckpt["ema_loss"], ckpt["elapsed_s"]
        losses = ckpt["losses"].tolist()
        print(f"resumed from {ckpt_path} at step {step} (loss EMA {ema_loss:.4f})", flush=True)

    def checkpoint() -> None:
        state = {
            "step": step,
            "transformer": transformer.state_dict(),
            "caption_encoder": encoder.state_dict(),
            "ema_transformer": ema_t.state_dict(),
            "ema_caption_encoder": ema_e.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data_rng": json.dumps(data_rng.bit_generator.state),
            "torch_rng": gen.get_state(),
            "losses": torch.tensor(losses, dtype=torch.float64),
            "ema_loss": ema_loss,
            "elapsed_s": elapsed,
            "args": json.dumps({k: str(v) for k, v in vars(args).items()}),
        }
        save_checkpoint(ckpt_path, state)
        if losses:
            plot_losses(losses, args.out / "loss_curve.png")

    signal.signal(signal.SIGTERM, _raise_interrupt)
    transformer.train()
    encoder.train()
    start_step = step
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True, mininterval=5)
    t_last = time.perf_counter()
    try:
        while step < args.steps:
            clips, captions = ref.sample_batch(data_rng, args.batch_size)
            drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
            texts = ["" if d else c.text for c, d in zip(captions, drop.tolist(), strict=True)]
            noise = torch.randn(clips.shape, generator=gen)
            t = torch.sigmoid(torch.randn(args.batch_size, generator=gen))
            tb = t.view(-1, 1, 1, 1, 1)
            x_t = (1 - tb) * clips + tb * noise
            context = encoder(ref.encode_captions(texts))
            pred = transformer(x_t, t * 1000.0, context, return_dict=False)[0]
            loss = F.mse_loss(pred, noise - clips)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)

            step += 1
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            value = float(loss)
            losses.append(value)
            ema_loss = value if math.isnan(ema_loss) else LOSS_EMA * ema_loss + (1 - LOSS_EMA) * value
            bar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}", refresh=False)
            bar.update(1)
            if step % args.log_every == 0 or step == args.steps:
                rate = elapsed / max(1, len(losses))
                bar.write(
                    f"step {step} loss {value:.4f} ema {ema_loss:.4f} grad {float(grad_norm):.3f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.2f} s/step elapsed {elapsed / 60:.1f} min"
                )
                sys.stdout.flush()
            if step % args.save_every == 0:
                checkpoint()
                t_last = time.perf_counter()  # checkpoint time is not training time
    except KeyboardInterrupt:
        bar.close()
        checkpoint()
        print(f"interrupted: saved {ckpt_path} at step {step}", flush=True)
        raise SystemExit(130) from None
    bar.close()
    if step > start_step:
        checkpoint()
        print(f"done: step {step}, loss EMA {ema_loss:.4f}, {elapsed / 60:.1f} min of training", flush=True)
    if args.export:
        ema_t.eval()
        ema_e.eval()
        export(ema_t, ema_e, losses, ema_loss, elapsed, args)


if __name__ == "__main__":
    main()
