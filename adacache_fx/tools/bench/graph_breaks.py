"""Dynamo graph breaks and recompilations of the transformer with a method enabled."""

from __future__ import annotations

import torch
import torch._dynamo

from .captions import CALIBRATION_CAPTIONS


def count_graph_breaks(bench, setting) -> tuple[int, int]:
    """``(graph breaks, recompilations)`` of the transformer with ``setting`` enabled, compiled with
    ``backend="eager"``, over a 3-step generation (Dynamo's counters)."""
    finish = setting.enable()
    model = bench.pipe.transformer
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        bench.pipe.transformer = torch.compile(model, backend="eager")
        bench.generate(CALIBRATION_CAPTIONS[0], 0, steps=3)
    finally:
        bench.pipe.transformer = model
        finish()
        counters = torch._dynamo.utils.counters
        counts = int(sum(counters["graph_break"].values())), int(sum(counters["recompiles"].values()))
        torch._dynamo.reset()
    return counts


def add_graph_breaks(bench, settings, failed, rows) -> None:
    """One count per method (its first setting that ran); every row of the method gets it."""
    counted: dict[str, tuple[int, int] | str] = {}
    for i, s in enumerate(settings):
        if s.compiled:  # counted while it compiled (harness warm-up)
            continue
        if i in failed or s.method in counted:
            continue
        bench.progress(f"graph breaks: {s.method}")
        try:
            counted[s.method] = count_graph_breaks(bench, s)
        except Exception as error:
            counted[s.method] = f"compile failed: {type(error).__name__}"
    for i, s in enumerate(settings):
        value = counted.get(s.method)
        if isinstance(value, tuple):
            rows[i].graph_breaks = value[0]
            value = f"{value[1]} recompilations in 3 compiled steps" if value[1] else None
        if value:
            rows[i].note = f"{rows[i].note}; {value}" if rows[i].note else value
