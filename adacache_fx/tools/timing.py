"""Honest timing helpers: repeated runs in one process, medians, ratios against a baseline of the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_s: float
    runs_s: tuple[float, ...]

    @property
    def spread(self) -> float:
        return (max(self.runs_s) - min(self.runs_s)) / self.median_s if self.median_s else 0.0


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Timing:
    """Median wall-clock time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        runs.append(time.perf_counter() - start)
    return Timing(statistics.median(runs), tuple(runs))


def measure_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Time several functions round-robin (so drift of the machine affects them alike); medians."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            runs[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(r), tuple(r)) for name, r in runs.items()}
