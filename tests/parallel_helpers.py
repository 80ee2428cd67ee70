"""Shared by the context-parallelism tests: 2 gloo ranks on CPU spawned from pytest, a tiny model under
diffusers' ``enable_parallelism``, one generation's schedule."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import adacache_fx
from adacache_fx.tools import fixtures
from adacache_fx.tools.fixtures.parallel import COLLECTIVE_TIMEOUT_S, cpu_device_count, gloo_process_group

WORLD = 2
NUM_STEPS = 6
NUM_LAYERS = 2
ALWAYS = {1e9: 1}  # every step computes; the metric is still measured and recorded


def parallel_model(family: str, dtype: torch.dtype = torch.float32, **config):
    from diffusers import ContextParallelConfig

    model, make_inputs = fixtures.build(family, NUM_LAYERS, dtype=dtype)
    with cpu_device_count():
        model.enable_parallelism(config=ContextParallelConfig(**config))
    return model, make_inputs


def run(model, make_inputs, codebook, enable_parallelism=None, **options):
    """``(outputs, history, computed, cached)`` of one generation of ``NUM_STEPS`` steps;
    ``enable_parallelism``: a ContextParallelConfig to enable after the transform."""
    return run_config(model, make_inputs, adacache_fx.AdaCacheConfig(num_steps=NUM_STEPS, codebook=codebook, **options),
                      enable_parallelism)


def run_config(model, make_inputs, config, enable_parallelism=None):
    """:func:`run` with any policy's ``config`` (``num_steps`` should be ``NUM_STEPS``)."""
    cached = adacache_fx.transform(model, config)
    if enable_parallelism is not None:
        with cpu_device_count():
            cached.enable_parallelism(config=enable_parallelism)
    outputs = [cached(**make_inputs(step))[0] for step in range(NUM_STEPS)]
    report = adacache_fx.report(cached)
    if isinstance(report, list):  # per-sample decisions: the batch's first (here only) row
        report = report[0]
    first = report.column(report.columns[0])  # the policy's metric (AdaCache's c, FirstBlockCache's diff...)
    history = torch.tensor([float("nan") if v is None else v for v in first])
    return outputs, history, [r.step for r in report.steps if r.computed], cached


def three_frames(make_inputs):
    """MoReg's tests: the fixture's inputs with a third latent frame (the second, shifted: some motion)."""
    def inputs(step):
        kwargs = make_inputs(step)
        h = kwargs["hidden_states"]
        return {**kwargs, "hidden_states": torch.cat([h, h[:, :, 1:].roll(2, dims=-1)], dim=2)}
    return inputs


def sensitive_codebook(global_metric: float, rank_metrics: list[float]) -> tuple[dict, int]:
    """A codebook whose threshold lies between the right metric and the farthest of ``rank_metrics``
    (a rank's own, or one missing some terms): the right metric gives rate 3, that one rate 1. Returns
    it and the index of that metric."""
    rank = max(range(len(rank_metrics)), key=lambda r: abs(rank_metrics[r] - global_metric))
    threshold = (global_metric + rank_metrics[rank]) / 2
    return ({threshold: 3, 1e9: 1} if global_metric < threshold else {threshold: 1, 1e9: 3}), rank


def rate(codebook: dict, metric: float) -> int:
    """The rate ``codebook`` gives ``metric``."""
    return next((r for t, r in codebook.items() if metric < t), list(codebook.values())[-1])


def process_group(rank: int, port: int):
    """This rank's gloo process group (every collective times out after ``COLLECTIVE_TIMEOUT_S``)."""
    return gloo_process_group(rank, WORLD, port, COLLECTIVE_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker, out_dir: str, timeout_s: float) -> list:
    """Run ``worker(rank, port, out_dir)`` in ``WORLD`` spawned processes, each saving what it saw to
    ``out_dir/rank{rank}.pt``; fail after ``timeout_s``. Returns what they saved, by rank."""
    context = mp.start_processes(worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} ranks did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
