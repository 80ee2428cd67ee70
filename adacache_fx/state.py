"""The state of a transformed model: its layout, the store that owns its tensors, and the report.

The rewritten graph is a pure function ``(inputs..., state...) -> (outputs..., new state...)``. This
module is the one place that knows what the state is:

* :class:`StateSpec` / :class:`StateLayout`: the names, shapes, dtypes and initial values of one
  rewritten program's state tensors, in graph order (serializable, so an exported file carries it);
* :class:`StateStore`: the tensors themselves, one set per (cache context, input signature):
  allocation, new generations, reset, and the stable *bound* tensors a compiled graph reads;
* :func:`read_report`: the per-step history read back on the host after a generation.

:class:`~adacache_fx.CachedModel` and the export runners (ONNX Runtime, TensorRT) all use these.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

#: The cache context used outside any ``cache_context(...)`` block.
DEFAULT_CONTEXT = "default"

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
    torch.uint8, torch.bool,
)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    return _DTYPES[name]


@dataclass(frozen=True)
class StateSpec:
    """One state tensor.

    ``shape=None`` is the history, one row per step (its rows depend on the number of steps N): a
    ``computed`` column, then one per name of ``columns`` (the policy's ``history_columns``);
    ``returned=False`` marks a tensor the graph reads but never updates; ``cache=True`` one that holds
    cached activations (counted as cache memory by reports).
    """

    name: str
    shape: tuple[int, ...] | None
    dtype: torch.dtype
    fill: float
    returned: bool = True
    cache: bool = False
    columns: tuple[str, ...] = ()

    def shape_for(self, num_steps: int) -> tuple[int, ...]:
        return (num_steps, 1 + len(self.columns)) if self.shape is None else tuple(self.shape)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "shape": None if self.shape is None else list(self.shape),
            "dtype": dtype_name(self.dtype), "fill": float(self.fill), "returned": self.returned, "cache": self.cache,
            "columns": list(self.columns),
        }

    @classmethod
    def from_dict(cls, data: dict) -> StateSpec:
        shape = None if data["shape"] is None else tuple(int(d) for d in data["shape"])
        return cls(data["name"], shape, dtype_from_name(data["dtype"]), float(data["fill"]), bool(data["returned"]),
                   bool(data["cache"]), tuple(data.get("columns", ())))


@dataclass(frozen=True)
class StateLayout:
    """The ordered state tensors of one rewritten program (graph inputs after the user inputs; the
    returned ones are graph outputs after the user outputs, in the same order)."""

    specs: tuple[StateSpec, ...]

    def __iter__(self) -> Iterator[StateSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    @property
    def returned(self) -> list[StateSpec]:
        return [spec for spec in self.specs if spec.returned]

    def spec(self, name: str) -> StateSpec:
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise KeyError(f"no state tensor {name!r}; the state is {self.names}")

    def allocate(self, num_steps: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """A fresh generation's state for N = ``num_steps``."""
        state = {}
        for spec in self.specs:
            fill = num_steps if spec.name == "num_steps" else spec.fill
            state[spec.name] = torch.full(spec.shape_for(num_steps), fill, dtype=spec.dtype, device=device)
        return state

    def to_dict(self) -> list[dict]:
        return [spec.to_dict() for spec in self.specs]

    @classmethod
    def from_dict(cls, data: list[dict]) -> StateLayout:
        return cls(tuple(StateSpec.from_dict(item) for item in data))


def start_generation(state: dict[str, torch.Tensor]) -> None:
    """Make ``state`` begin a new generation on its next step (the graph resets the rest itself)."""
    state["step"].zero_()
    state["history"].fill_(float("nan"))


def check_num_steps(num_steps, minimum: int = 3) -> int:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < minimum:
        raise ValueError(
            f"num_steps must be an int >= {minimum} (steps 1, N-1 and N always compute), got {num_steps!r}"
        )
    return num_steps


class StateStore:
    """The state tensors of a transformed model, per cache context and input signature (*key*).

    Each key has a :class:`StateLayout` and a device; its tensors are allocated on first use in each
    context, for the current number of steps N. For a graph that must see the same tensors whatever
    the context (a compiled graph), :meth:`bound` gives one stable set per key, re-pointed at the
    active context's storage by :meth:`switch` (``Tensor.set_``: no copy).
    """

    def __init__(self, num_steps: int | None = None):
        self.num_steps = None if num_steps is None else check_num_steps(num_steps)
        self.active = DEFAULT_CONTEXT
        self._layouts: dict[Hashable, tuple[StateLayout, torch.device]] = {}
        self._storage: dict[str, dict[Hashable, dict[str, torch.Tensor]]] = {}
        self._bound: dict[Hashable, dict[str, torch.Tensor]] = {}
        self._last_key: dict[str, Hashable] = {}
        self._epoch = 0  # counts resets: a context used in an older epoch than another one is stale
        self._used: dict[str, int] = {}

    # -- layouts and storage ---------------------------------------------------------------------
    def add_layout(self, key: Hashable, layout: StateLayout, device: torch.device | str = "cpu") -> None:
        """Set the layout of ``key``; a key captured again with another layout loses its tensors (the same
        layout keeps them: a generation in progress goes on)."""
        entry = (layout, torch.device(device))
        if repr(self._layouts.get(key, entry)) != repr(entry):  # (repr: a NaN fill equals itself)
            for states in self._storage.values():
                states.pop(key, None)
            self._bound.pop(key, None)
            self._last_key = {c: k for c, k in self._last_key.items() if k != key}
        self._layouts[key] = entry

    def layout(self, key: Hashable) -> StateLayout:
        return self._layouts[key][0]

    @property
    def contexts(self) -> list[str]:
        """The cache contexts that ran a call (since the last change of N), in the order they were first used."""
        return list(self._last_key)

    def get(self, key: Hashable, context: str | None = None) -> dict[str, torch.Tensor]:
        """The state of ``key`` in ``context`` (default: the active one), allocated on first use."""
        context = self.active if context is None else context
        states = self._storage.setdefault(context, {})
        state = states.get(key)
        if state is None:
            if self.num_steps is None:
                raise ValueError(
                    "adacache_fx does not know the number of denoising steps N: set "
                    "AdaCacheConfig(num_steps=N), call adacache_fx.reset(model, num_steps=N) before the "
                    "generation, or use adacache_fx.enable(pipe) with a diffusers pipeline"
                )
            layout, device = self._layouts[key]
            state = states[key] = layout.allocate(self.num_steps, device)
        return state

    def replace(self, key: Hashable, state: dict[str, torch.Tensor], context: str | None = None) -> None:
        """Make ``state`` the storage of ``key`` in ``context`` (double-buffering runners swap sets)."""
        self._storage.setdefault(self.active if context is None else context, {})[key] = state

    def last(self, context: str | None = None) -> tuple[Hashable, dict[str, torch.Tensor]] | None:
        """``(key, state)`` of the signature last used in ``context``, or None."""
        context = self.active if context is None else context
        key = self._last_key.get(context)
        state = None if key is None else self._storage.get(context, {}).get(key)
        return None if state is None else (key, state)

    @property
    def generation_contexts(self) -> list[str]:
        """The contexts used since the latest reset that was followed by a call (the latest generation)."""
        latest = max(self._used.values(), default=None)
        return [c for c, epoch in self._used.items() if epoch == latest and c in self._last_key]

    def use(self, key: Hashable) -> None:
        """Record that the active context runs ``key`` now; refuse a new signature mid-generation
        (reads the step counter on the host: called eagerly, before the graph runs)."""
        last = self.last()
        if last is not None and last[0] != key:
            old = last[1]
            if 0 < int(old["step"]) < int(old["num_steps"]):
                raise ValueError(
                    f"the input signature changed in the middle of a generation (step {int(old['step'])} "
                    f"of {int(old['num_steps'])} in cache context {self.active!r}); call "
                    "adacache_fx.reset(model) first. The cached state was left untouched."
                )
        self._last_key[self.active] = key
        self._used[self.active] = self._epoch

    # -- binding ---------------------------------------------------------------------------------
    def bound(self, key: Hashable) -> dict[str, torch.Tensor]:
        """The stable tensors of ``key``, pointing at the active context's storage."""
        bound = self._bound.get(key)
        if bound is None:
            storage = self.get(key)
            bound = {name: torch.empty(0, dtype=t.dtype, device=t.device) for name, t in storage.items()}
            self._bound[key] = bound
            self._rebind(key)
        return bound

    def _rebind(self, key: Hashable) -> None:
        storage, bound = self.get(key), self._bound[key]
        with torch.no_grad():
            for name, tensor in storage.items():
                bound[name].set_(tensor)

    def switch(self, context: str) -> None:
        """Make ``context`` the active one and re-point every bound set at its storage."""
        self.active = context
        for key in self._bound:
            self._rebind(key)

    # -- generations -----------------------------------------------------------------------------
    def begin_generation(self, num_steps: int | None = None) -> None:
        """A new generation starts in the active context (in every context if N changes). A pipeline may
        run fewer than 3 steps: every step then computes."""
        if num_steps is not None and num_steps != self.num_steps:
            self.reset(num_steps, minimum=1)
            return
        for state in self._storage.get(self.active, {}).values():
            start_generation(state)

    def reset(self, num_steps: int | None = None, minimum: int = 3) -> None:
        """Start a new generation in every context; a new N (at least ``minimum``) reallocates the state."""
        self._epoch += 1
        if num_steps is not None and check_num_steps(num_steps, minimum) != self.num_steps:
            self.num_steps = num_steps
            self._storage.clear()
            self._last_key.clear()
            for key in self._bound:
                self._rebind(key)
            return
        for states in self._storage.values():
            for state in states.values():
                start_generation(state)

    def clear(self) -> None:
        """Forget every layout and tensor (the model's weights moved)."""
        self._layouts.clear()
        self._storage.clear()
        self._bound.clear()
        self._last_key.clear()
        self._used.clear()


# -- report --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepRecord:
    """One step of a generation: whether it computed, and what the policy recorded, by the policy's own
    column names (``record["metric"]``; None where nothing was measured). ``nonfinite`` marks a compute
    step after the first whose first column (AdaCache's metric) is NaN or infinite (AdaCache then chose
    its most conservative rate)."""

    step: int
    computed: bool
    values: Mapping[str, float | None] = field(default_factory=dict)
    nonfinite: bool = False

    def __getitem__(self, name: str) -> float | None:
        return self.values[name]


@dataclass(frozen=True)
class Report:
    """What happened in the current generation of one cache context."""

    context: str
    num_steps: int
    steps: list[StepRecord]
    cache_bytes: int
    regions: list[str]
    metric_sites: list[str]
    #: What the policy records (its ``history_columns``), after ``computed``.
    columns: tuple[str, ...] = ()
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
            lines.append(f"at most {self.max_cacheable} of {self.num_steps} steps can be cached (steps "
                         f"{list(self.always_computed)} always compute)")
        return "\n".join(lines)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def read_report(state: dict[str, torch.Tensor], layout: StateLayout, context: str, regions: list[str],
                metric_sites: list[str]) -> Report:
    """Read a state's history on the host (after a generation, never inside one); its columns are
    named by the layout's history spec (the policy's ``history_columns``)."""
    columns = layout.spec("history").columns
    done = int(state["step"])
    steps = []
    for i, (computed, *values) in enumerate(state["history"][:done].tolist()):
        computed = bool(computed)
        has_metric = computed and i > 0  # every compute step after the first measures the metric
        first = values[0] if values else 0.0
        steps.append(StepRecord(i + 1, computed, dict(zip(columns, map(_finite_or_none, values))),
                                nonfinite=has_metric and not math.isfinite(first)))
    cache_bytes = sum(state[spec.name].numel() * state[spec.name].element_size() for spec in layout if spec.cache)
    return Report(context, int(state["num_steps"]), steps, cache_bytes, list(regions), list(metric_sites), columns)
