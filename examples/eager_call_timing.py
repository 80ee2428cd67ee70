"""Time one computed transformer call of the bundled reference model three ways, interleaved in one process:
the uncached model, the rewritten graph module, and its eager twin (what ``CachedModel`` runs eagerly).

    python examples/eager_call_timing.py [--repeats 60]

Prints the median of each (1 thread). Run it with nothing else running.
"""

import argparse
import statistics
import time

import torch

from adacache_fx import transform
from adacache_fx.policies import MagCacheConfig
from adacache_fx.tools.bench.captions import EVAL_CAPTIONS
from adacache_fx.tools.reference.pipeline import ReferencePipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = ReferencePipeline.from_reference()
    pipe.set_progress_bar_config(disable=True)
    base, steps = pipe.transformer, 30
    calls = []
    handle = base.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    pipe(EVAL_CAPTIONS[0], num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    handle.remove()
    call_args, call_kwargs = calls[10]  # the cond call of step 6
    # threshold 0, no skips: every call computes
    cached = transform(base, MagCacheConfig(num_steps=steps, mag_ratios=[1.0] * steps, threshold=0.0, max_skip_steps=0))
    with torch.no_grad():
        cached(*call_args, **call_kwargs)
        program, state = cached.prepare_call(call_args, call_kwargs)
        flat, values = program.captured.flatten_inputs(call_args, call_kwargs), list(state.values())
        runs = {"uncached model": lambda: base(*call_args, **call_kwargs),
                "graph module": lambda: program.graph_module(*flat, *values),
                "eager twin": lambda: program.eager(*flat, *values)}
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    for name, seconds in times.items():
        print(f"{name:16s} {statistics.median(seconds) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
