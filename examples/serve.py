"""A toy video server on the bundled reference model: a queue of requests with different captions and step
counts, batched by step count, the batches interleaved step by step (a server's loop), each batch in its
own cache context with its own N, released when done.

Three runs of the same queue (same seeds): uncached, AdaCache with one decision per batch ("shared"),
and AdaCache with per-video decisions ("per_sample"). Prints throughput (videos per minute, medians of
``--repeats`` runs in this process) and each request's computed steps, and the mean absolute difference
of the videos' final latents to the uncached ones. Run with nothing else on the machine:

    python examples/serve.py --requests 8 --batch 4 --threads 1

The reference model is trained at one size (8 x 32 x 32), so every request has it; one capture per input
shape (dynamic shapes are not built yet).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import adacache_fx as ax
from adacache_fx.tools.reference.data import CHANNELS, HEIGHT, NUM_FRAMES, WIDTH, evaluation_captions
from adacache_fx.tools.reference.model import load_reference_model


@dataclass
class Batch:
    """Requests with the same N denoised together; ``step`` counts the steps done."""

    name: str
    requests: list[int]
    num_steps: int
    latents: torch.Tensor
    text: torch.Tensor
    scheduler: FlowMatchEulerDiscreteScheduler
    step: int = 0
    computed: list[list[int]] = field(default_factory=list)


def make_queue(num_requests: int, steps: tuple[int, ...]) -> list[tuple[str, int]]:
    captions = evaluation_captions()
    return [(captions[i % len(captions)].text, steps[i % len(steps)]) for i in range(num_requests)]


def batches_of(queue, encoder, batch_size: int) -> list[Batch]:
    by_steps: dict[int, list[int]] = {}
    for i, (_, n) in enumerate(queue):
        by_steps.setdefault(n, []).append(i)
    batches = []
    for n, ids in by_steps.items():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            noise = torch.stack([torch.randn(CHANNELS, NUM_FRAMES, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(i))
                                 for i in chunk])
            scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
            scheduler.set_timesteps(n)
            with torch.no_grad():
                text = encoder.encode([queue[i][0] for i in chunk])
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
                    v = model(batch.latents, timestep, batch.text, return_dict=False)[0]
            else:
                v = model(batch.latents, timestep, batch.text, return_dict=False)[0]
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
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the queue per mode (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformer, encoder = load_reference_model()
    queue = make_queue(args.requests, tuple(args.steps))
    modes = {
        "uncached": transformer,
        "shared": ax.transform(copy.deepcopy(transformer), ax.AdaCacheConfig()),
        "per_sample": ax.transform(copy.deepcopy(transformer), ax.AdaCacheConfig(batch_decisions="per_sample")),
    }
    results = {}
    for name, model in modes.items():
        times, videos, batches = [], None, None
        for _ in range(1 + args.repeats):  # the first run captures (one program per batch shape)
            batches = batches_of(queue, encoder, args.batch)
            start = time.perf_counter()
            videos = serve(model, batches)
            times.append(time.perf_counter() - start)
        computed = {i: steps for b in batches for i, steps in zip(b.requests, b.computed)}
        results[name] = (statistics.median(times[1:]), videos, computed)
    base_time, base_videos, _ = results["uncached"]
    print(f"{args.requests} requests (N in {args.steps}), batches of <= {args.batch}, {args.threads} thread(s); "
          f"median of {args.repeats} runs each")
    print("| mode | wall s | videos/min | vs uncached | mean computed steps | mean abs diff to uncached (latents) |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, videos, computed) in results.items():
        mean = statistics.mean(len(c) for c in computed.values()) if computed else float("nan")
        diff = statistics.mean(float((videos[i] - base_videos[i]).abs().mean()) for i in videos)
        print(f"| {name} | {seconds:.2f} | {60 * args.requests / seconds:.1f} | {base_time / seconds:.2f}x | "
              f"{mean:.1f} | {diff:.3g} |")
    print("\n| request | caption | N | computed (shared) | computed (per_sample) |")
    print("|---|---|---|---|---|")
    for i, (caption, n) in enumerate(queue):
        shared, own = results["shared"][2][i], results["per_sample"][2][i]
        print(f"| {i} | {caption} | {n} | {len(shared)}: {shared} | {len(own)}: {own} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
