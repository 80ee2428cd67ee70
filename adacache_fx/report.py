"""The report of a generation: its per-step history, read back on the host (after a generation, never
inside one), named by the policy's own columns."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from .state import StateLayout


@dataclass(frozen=True)
class StepRecord:
    """One step of a generation: whether it computed, and what the policy recorded, by the policy's own
    column names (``record["metric"]``; None where nothing was measured). ``nonfinite`` marks a compute
    step after the first whose checked column (the policy's ``checked_column``: AdaCache's metric) is NaN
    or infinite (AdaCache then chose its most conservative rate)."""

    step: int
    computed: bool
    values: Mapping[str, float | None] = field(default_factory=dict)
    nonfinite: bool = False

    def __getitem__(self, name: str) -> float | None:
        return self.values[name]


@dataclass(frozen=True)
class Report:
    """What happened in the current generation of one cache context (of one batch row, ``row``, with
    per-sample decisions; ``cache_bytes`` is then that row's share)."""

    context: str
    num_steps: int
    steps: list[StepRecord]
    cache_bytes: int
    regions: list[str]
    metric_sites: list[str]
    #: What the policy records (its ``history_columns``), after ``computed``.
    columns: tuple[str, ...] = ()
    row: int | None = None
    #: The steps the policy computes whatever the model does (its first and forced last steps: the schedule
    #: when nothing changes between steps); None when unknown (a rule that cannot be replayed at
    #: this N, or a report without the config: the export runners).
    always_computed: tuple[int, ...] | None = None

    @property
    def max_cacheable(self) -> int | None:
        """How many of the N steps can be cached at all (N minus :attr:`always_computed`)."""
        return None if self.always_computed is None else self.num_steps - len(self.always_computed)

    @property
    def computed_steps(self) -> list[int]:
        return [r.step for r in self.steps if r.computed]

    @property
    def num_computed(self) -> int:
        return len(self.computed_steps)

    def column(self, name: str) -> list[float | None]:
        """One recorded column, step by step."""
        return [r.values[name] for r in self.steps]

    def __str__(self) -> str:
        def shown(r: StepRecord, name: str) -> str:
            value = r.values.get(name)
            if r.nonfinite and name == self.columns[0]:
                return "non-finite"
            if value is None:
                return ""
            return str(int(value)) if float(value).is_integer() and abs(value) < 1e9 else f"{value:.4f}"

        header = ("step", "computed", *self.columns)
        rows = [(str(r.step), "yes" if r.computed else "cached", *(shown(r, c) for c in self.columns))
                for r in self.steps]
        widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]
        lines = [
            f"adacache_fx report ({self.context}): {self.num_computed}/{len(self.steps)} steps computed, "
            f"cache {self.cache_bytes / 2**20:.2f} MiB, regions {self.regions}, metric at {self.metric_sites}",
            " ".join(f"{h:>{w}}" for h, w in zip(header, widths)),
        ]
        lines += [" ".join(f"{v:>{w}}" for v, w in zip(row, widths)) for row in rows]
        if self.always_computed is not None:
            lines.append(f"at most {self.max_cacheable} of {self.num_steps} steps can be cached (the fewest this rule "
                         f"computes, when nothing changes between steps: {list(self.always_computed)})")
        return "\n".join(lines)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def read_report(state: dict[str, torch.Tensor], layout: StateLayout, context: str, regions: list[str],
                metric_sites: list[str], always_computed: tuple[int, ...] | None = None) -> Report | list[Report]:
    """Read a state's history on the host (after a generation, never inside one); its columns are
    named by the layout's history spec (the policy's ``history_columns``). With per-sample decisions,
    one report per batch row. ``always_computed``: the steps the rule computes whatever the video."""
    spec = layout.spec("history")
    if spec.batch is not None:  # each row's share of the cache memory, and its index
        return [replace(_read_rows(state, state["history"][:, b], layout, context, regions, metric_sites),
                        row=b, cache_bytes=_cache_bytes(state, layout) // spec.batch, always_computed=always_computed)
                for b in range(spec.batch)]
    return replace(_read_rows(state, state["history"], layout, context, regions, metric_sites),
                   always_computed=always_computed)


def _read_rows(state, history, layout, context, regions, metric_sites) -> Report:
    spec = layout.spec("history")
    columns = spec.columns
    done = int(state["step"])
    steps = []
    for i, (computed, *values) in enumerate(history[:done].tolist()):
        computed = bool(computed)
        row = dict(zip(columns, values))
        # every compute step after the first measures the policy's checked column (AdaCache's metric)
        nonfinite = spec.checked is not None and computed and i > 0 and not math.isfinite(row[spec.checked])
        steps.append(StepRecord(i + 1, computed, {k: _finite_or_none(v) for k, v in row.items()}, nonfinite))
    return Report(context, int(state["num_steps"]), steps, _cache_bytes(state, layout), list(regions),
                  list(metric_sites), columns)


def _cache_bytes(state, layout) -> int:
    return sum(state[spec.name].numel() * state[spec.name].element_size() for spec in layout if spec.cache)
