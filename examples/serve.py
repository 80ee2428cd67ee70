"""A toy video server on the bundled reference model: a queue of requests with different captions, sizes
and step counts, batched by (size, N), the batches interleaved step by step (a server's loop), each batch
in its own cache context with its own N, released when done. The cached models are transformed with
dynamic frames, height and width (``dynamic_shapes=``): one capture serves every size and every N.

Three runs of the same queue (same seeds): uncached, AdaCache with one decision per batch ("shared"),
and AdaCache with per-video decisions ("per_sample"). Prints throughput (videos per minute, medians of
``--repeats`` runs in this process) and each request's computed steps, and the mean absolute difference
of the videos' final latents to the uncached ones. Run with nothing else on the machine:

    python examples/serve.py --requests 8 --batch 4 --sizes 8x32 4x24 --threads 1

The reference model is trained at 8 frames x 32 x 32; other sizes (``--sizes FRAMESxSIDE``, the side a
multiple of the patch size 4) run the same weights, so their videos follow their captions less, but they
cost and cache as a server's other resolutions would.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.export import Dim

import adacache_fx as ax
from adacache_fx.tools.reference.data import CHANNELS, evaluation_captions
from adacache_fx.tools.reference.model import load_reference_model


@dataclass
class Batch:
    """Requests with the same N denoised together; ``step`` counts the steps done."""

    name: str
    requests: list[int]
    num_steps: int
    latents: torch.Tensor
    text: dict[str, torch.Tensor]  # the transformer's caption keyword arguments
    scheduler: FlowMatchEulerDiscreteScheduler
    step: int = 0
    computed: list[list[int]] = field(default_factory=list)


#: The frames, height and width the cached models keep symbolic (the reference model's patches are 1 x 4 x 4).
DYNAMIC = {"hidden_states": {2: Dim("frames", max=32), 3: 4 * Dim("h", max=32), 4: 4 * Dim("w", max=32)}}


def parse_size(text: str) -> tuple[int, int]:
    """``"8x32"`` -> (frames 8, side 32); the side a multiple of 4, both at least 2."""
    try:
        frames, side = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is FRAMESxSIDE, e.g. 8x32, got {text!r}") from None
    if frames < 2 or side < 8 or side % 4:
        raise argparse.ArgumentTypeError(f"frames >= 2 and a side >= 8 that is a multiple of 4, got {text!r}")
    return frames, side


def make_queue(num_requests: int, steps: tuple[int, ...], sizes=((8, 32),)) -> list[tuple[str, int, tuple[int, int]]]:
    """``(caption, N, (frames, side))`` of each request; captions, Ns and sizes dealt in turn."""
    captions = evaluation_captions()
    return [(captions[i % len(captions)].text, steps[i % len(steps)], sizes[(i // len(steps)) % len(sizes)])
            for i in range(num_requests)]


def batches_of(queue, encoder, batch_size: int) -> list[Batch]:
    by_shape: dict[tuple, list[int]] = {}
    for i, (_, n, size) in enumerate(queue):
        by_shape.setdefault((size, n), []).append(i)
    batches = []
    for ((frames, side), n), ids in by_shape.items():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            noise = torch.stack([torch.randn(CHANNELS, frames, side, side, generator=torch.Generator().manual_seed(i))
                                 for i in chunk])
            scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
            scheduler.set_timesteps(n)
            with torch.no_grad():
                text = encoder.encode_conditioning([queue[i][0] for i in chunk])
            batches.append(Batch(f"batch-{len(batches)}", chunk, n, noise, text, scheduler))
    return batches


@torch.no_grad()
def serve(model, batches: list[Batch]) -> dict[int, torch.Tensor]:
    """Round-robin: one denoising step of every unfinished batch in turn; returns each request's video."""
    videos, active = {}, list(batches)
    cached = isinstance(model, ax.CachedModel)
    while active:
        for batch in list(active):
            t = batch.scheduler.timesteps[batch.step]
            timestep = t.expand(batch.latents.shape[0])
            if cached:
                with model.cache_context(batch.name, num_steps=batch.num_steps):
                    v = model(batch.latents, timestep, **batch.text, return_dict=False)[0]
            else:
                v = model(batch.latents, timestep, **batch.text, return_dict=False)[0]
            batch.latents = batch.scheduler.step(v.float(), t, batch.latents, return_dict=False)[0]
            batch.step += 1
            if batch.step == batch.num_steps:
                active.remove(batch)
                if cached:
                    reports = ax.report(model, batch.name)
                    reports = reports if isinstance(reports, list) else [reports] * len(batch.requests)
                    batch.computed = [r.computed_steps for r in reports]
                    ax.release(model, batch.name)
                videos.update(zip(batch.requests, batch.latents))
    return videos


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8, help="requests in the queue")
    parser.add_argument("--batch", type=int, default=4, help="largest batch")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 30], help="the requests' step counts, dealt in turn")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(8, 32), (4, 24)], metavar="FxS",
                        help="the requests' sizes, frames x side (default: 8x32 4x24), dealt in turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the queue per mode (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformer, encoder = load_reference_model()
    queue = make_queue(args.requests, tuple(args.steps), tuple(args.sizes))
    modes = {
        "uncached": transformer,
        "shared": ax.transform(copy.deepcopy(transformer), ax.AdaCacheConfig(), dynamic_shapes=DYNAMIC),
        "per_sample": ax.transform(copy.deepcopy(transformer), ax.AdaCacheConfig(batch_decisions="per_sample"),
                                   dynamic_shapes=DYNAMIC),
    }
    results = {}
    for name, model in modes.items():
        times, videos, batches = [], None, None
        for _ in range(1 + args.repeats):  # the first run captures (one program for every size and N)
            batches = batches_of(queue, encoder, args.batch)
            start = time.perf_counter()
            videos = serve(model, batches)
            times.append(time.perf_counter() - start)
        computed = {i: steps for b in batches for i, steps in zip(b.requests, b.computed)}
        results[name] = (statistics.median(times[1:]), videos, computed)
    base_time, base_videos, _ = results["uncached"]
    sizes = ", ".join(f"{f}x{s}x{s}" for f, s in args.sizes)
    captures = {name: model.captures for name, model in modes.items() if isinstance(model, ax.CachedModel)}
    print(f"{args.requests} requests (N in {args.steps}, sizes {sizes}), batches of <= {args.batch}, "
          f"{args.threads} thread(s); median of {args.repeats} runs each; captures {captures}")
    print("| mode | wall s | videos/min | vs uncached | mean computed steps | mean abs diff to uncached (latents) |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, videos, computed) in results.items():
        mean = statistics.mean(len(c) for c in computed.values()) if computed else float("nan")
        diff = statistics.mean(float((videos[i] - base_videos[i]).abs().mean()) for i in videos)
        print(f"| {name} | {seconds:.2f} | {60 * args.requests / seconds:.1f} | {base_time / seconds:.2f}x | "
              f"{mean:.1f} | {diff:.3g} |")
    print("\n| request | caption | size | N | computed (shared) | computed (per_sample) |")
    print("|---|---|---|---|---|---|")
    for i, (caption, n, (frames, side)) in enumerate(queue):
        shared, own = results["shared"][2][i], results["per_sample"][2][i]
        print(f"| {i} | {caption} | {frames}x{side}x{side} | {n} | {len(shared)}: {shared} | {len(own)}: {own} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
