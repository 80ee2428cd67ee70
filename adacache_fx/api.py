"""The user-facing verbs: transform, reset, report."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .config import AdaCacheConfig
from .module import CachedModel


def transform(model: nn.Module, config: AdaCacheConfig | None = None) -> CachedModel:
    """Return ``model`` wrapped so that its block stack is cached with AdaCache.

    The model is captured lazily on its first call (like ``torch.compile``); the result can be
    called, compiled with ``torch.compile(..., fullgraph=True)`` or exported like the original.
    """
    if isinstance(model, CachedModel):
        raise ValueError("this model is already transformed by adacache_fx")
    if not isinstance(model, nn.Module):
        raise TypeError(f"adacache_fx.transform expects an nn.Module, got {type(model).__name__}")
    if config is None:
        config = AdaCacheConfig()
    if not isinstance(config, AdaCacheConfig):
        raise TypeError(f"config must be an adacache_fx.AdaCacheConfig, got {type(config).__name__}")
    return CachedModel(model, config)


def _cached(model) -> CachedModel:
    inner = getattr(model, "_orig_mod", model)  # a torch.compile'd CachedModel
    if not isinstance(inner, CachedModel):
        raise TypeError("expected a model returned by adacache_fx.transform")
    return inner


def reset(model, num_steps: int | None = None) -> None:
    """Start a new generation (in every cache context); optionally set the number of steps N."""
    _cached(model).reset(num_steps)


@dataclass(frozen=True)
class StepRecord:
    step: int
    computed: bool
    metric: float | None
    motion: float | None
    rate: int


@dataclass(frozen=True)
class Report:
    """What happened in the current generation of one cache context."""

    context: str
    num_steps: int
    steps: list[StepRecord]
    cache_bytes: int
    regions: list[str]
    metric_sites: list[str]

    @property
    def computed_steps(self) -> list[int]:
        return [r.step for r in self.steps if r.computed]

    @property
    def num_computed(self) -> int:
        return len(self.computed_steps)

    def __str__(self) -> str:
        lines = [
            f"adacache_fx report ({self.context}): {self.num_computed}/{len(self.steps)} steps computed, "
            f"cache {self.cache_bytes / 2**20:.2f} MiB, regions {self.regions}, metric at {self.metric_sites}",
            " step  computed   metric   motion  rate",
        ]
        for r in self.steps:
            metric = "" if r.metric is None else f"{r.metric:.4f}"
            motion = "" if r.motion is None else f"{r.motion:.4f}"
            lines.append(f" {r.step:4d}  {'yes' if r.computed else 'cached':>8} {metric:>8} {motion:>8} {r.rate:5d}")
        return "\n".join(lines)


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def report(model, context: str | None = None) -> Report:
    """Per-step records of the current generation (computed or cached, metric c, motion m, rate).

    Reads the state from the device: call it after a generation, not inside the loop.
    """
    cached = _cached(model)
    context = cached._context if context is None else context
    state = cached.current_state(context)
    if state is None:
        raise RuntimeError(f"no generation has run in cache context {context!r} yet")
    program = cached.program(context)
    done = int(state["step"])
    rows = state["history"][:done].tolist()
    steps = [
        StepRecord(i + 1, bool(row[0]), _number(row[1]), _number(row[2]), int(row[3])) for i, row in enumerate(rows)
    ]
    cache_bytes = sum(
        t.numel() * t.element_size() for name, t in state.items() if name.startswith(("cache_", "p_prev_"))
    )
    return Report(
        context, int(state["num_steps"]), steps, cache_bytes, program.rewrite.regions, program.rewrite.metric_sites
    )
