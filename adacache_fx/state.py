"""The state of a transformed model: its layout and the store that owns its tensors.

The rewritten graph is a pure function ``(inputs..., state...) -> (outputs..., new state...)``. This
module is the one place that knows what the state is:

* :class:`StateSpec` / :class:`StateLayout`: the names, shapes, dtypes and initial values of one
  rewritten program's state tensors, in graph order (serializable, so an exported file carries it);
* :class:`StateStore`: the tensors themselves, one set per (cache context, input signature):
  allocation, new generations, reset, and the stable *bound* tensors a compiled graph reads;
:class:`~adacache_fx.CachedModel` and the export runners (ONNX Runtime, TensorRT) all use these; the
history read back on the host after a generation is :mod:`adacache_fx.report`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

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
    shape: tuple[int | str, ...] | None  # a str: an expression of the symbolic input sizes (a dynamic-shape capture)
    dtype: torch.dtype
    fill: float
    returned: bool = True
    cache: bool = False
    columns: tuple[str, ...] = ()
    checked: str | None = None  # the column a compute step after the first must hold a finite value in
    batch: int | None = None  # per-sample decisions: a history row per video (``[N, B, columns]``)

    def shape_for(self, num_steps: int) -> tuple[int, ...]:
        if self.shape is not None:
            return tuple(self.shape)
        rows = (self.batch,) if self.batch is not None else ()
        return (num_steps, *rows, 1 + len(self.columns))

    def to_dict(self) -> dict:
        return {
            "name": self.name, "shape": None if self.shape is None else list(self.shape),
            "dtype": dtype_name(self.dtype), "fill": float(self.fill), "returned": self.returned, "cache": self.cache,
            "columns": list(self.columns), "checked": self.checked, "batch": self.batch,
        }

    @classmethod
    def from_dict(cls, data: dict) -> StateSpec:
        shape = None if data["shape"] is None else tuple(d if isinstance(d, str) else int(d) for d in data["shape"])
        return cls(data["name"], shape, dtype_from_name(data["dtype"]), float(data["fill"]), bool(data["returned"]),
                   bool(data["cache"]), tuple(data.get("columns", ())), data.get("checked"), data.get("batch"))


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

    @property
    def symbolic(self) -> bool:
        """Whether a state shape is an expression of the input sizes (see :meth:`resolve`)."""
        return any(isinstance(d, str) for spec in self.specs for d in (spec.shape or ()))

    def resolve(self, sizes: dict[str, int]) -> StateLayout:
        """This layout with each symbolic dimension evaluated at the input sizes ``sizes`` (symbol -> int)."""
        return StateLayout(tuple(dataclasses.replace(spec, shape=tuple(
            eval_size(d, sizes) if isinstance(d, str) else d for d in spec.shape)) if spec.shape else spec
            for spec in self.specs))

    @classmethod
    def from_dict(cls, data: list[dict]) -> StateLayout:
        return cls(tuple(StateSpec.from_dict(item) for item in data))


def eval_size(expression: str, sizes: dict[str, int]) -> int:
    """An expression of the symbolic input sizes (``"s25*s33*s56"``) at ``sizes``."""
    import sympy

    value = sympy.sympify(expression).subs({sympy.Symbol(k): v for k, v in sizes.items()})
    if not value.is_Integer:
        raise ValueError(f"the state size {expression} is not known from the input sizes {sizes}")
    return int(value)


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
        self._steps: dict[str, int] = {}  # contexts with their own N (a server's requests)
        self._stale: set[Hashable] = set()  # bound sets whose context storage was released

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

    def steps_for(self, context: str | None = None) -> int | None:
        """N of ``context`` (default: the active one): its own, else the store's."""
        return self._steps.get(self.active if context is None else context, self.num_steps)

    def set_steps(self, context: str, num_steps: int) -> None:
        """Give ``context`` its own N; a different N than it had drops its state (a new generation)."""
        check_num_steps(num_steps)
        if self.steps_for(context) != num_steps and context in self._storage:
            self._drop(context)
        self._steps[context] = num_steps

    def release(self, context: str) -> None:
        """Forget ``context``: its tensors are freed (no bound set keeps them) and its N forgotten."""
        if context not in self._storage and context not in self._steps and context not in self._last_key:
            raise KeyError(f"no cache context {context!r} (contexts: {self.contexts})")
        self._drop(context)
        self._steps.pop(context, None)

    def _drop(self, context: str) -> None:
        self._storage.pop(context, None)
        self._last_key.pop(context, None)
        self._used.pop(context, None)
        if context == self.active:  # the bound sets point at the dropped tensors: let them go now
            for key in self._bound:
                self._unbind(key)

    def get(self, key: Hashable, context: str | None = None) -> dict[str, torch.Tensor]:
        """The state of ``key`` in ``context`` (default: the active one), allocated on first use."""
        context = self.active if context is None else context
        states = self._storage.setdefault(context, {})
        state = states.get(key)
        if state is None:
            num_steps = self.steps_for(context)
            if num_steps is None:
                raise ValueError(
                    f"adacache_fx does not know the number of denoising steps N of cache context {context!r}: "
                    "set num_steps=N in the config, call adacache_fx.reset(model, num_steps=N) before the "
                    "generation, give the context its own (model.cache_context(name, num_steps=N)), or use "
                    "adacache_fx.enable(pipe) with a diffusers pipeline"
                )
            layout, device = self._layouts[key]
            state = states[key] = layout.allocate(num_steps, device)
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

    def latest(self, context: str) -> tuple[Hashable, dict[str, torch.Tensor]]:
        """:meth:`last` of a context the latest generation used; RuntimeError, saying why, for any other."""
        last = self.last(context)
        if last is None:
            raise RuntimeError(
                f"no generation has run in cache context {context!r} yet (contexts with state: {self.contexts})"
            )
        if context not in self.generation_contexts:
            raise RuntimeError(
                f"cache context {context!r} was not used in the latest generation: its records are from an "
                f"earlier one (contexts of the latest generation: {self.generation_contexts})"
            )
        return last

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
            if "history" in bound:  # its rows are N: a compiled graph serves every N (a request's own)
                torch._dynamo.maybe_mark_dynamic(bound["history"], 0)
            self._bound[key] = bound
            self._rebind(key)
        elif key in self._stale:
            self._rebind(key)
        return bound

    def _unbind(self, key: Hashable) -> None:
        """Point ``key``'s bound set at nothing (it keeps no context's tensors); :meth:`bound` rebinds it."""
        with torch.no_grad():
            for tensor in self._bound[key].values():
                tensor.set_(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
        self._stale.add(key)

    def _rebind(self, key: Hashable, lazy: bool = False) -> None:
        if lazy and key not in self._storage.get(self.active, {}):
            self._unbind(key)  # allocated (with the context's N) on the first call that uses it
            return
        self._stale.discard(key)
        storage, bound = self.get(key), self._bound[key]
        with torch.no_grad():
            for name, tensor in storage.items():
                bound[name].set_(tensor)

    def switch(self, context: str) -> None:
        """Make ``context`` the active one and re-point every bound set at its storage (a signature
        the context has not run yet is allocated on its first call there)."""
        self.active = context
        for key in self._bound:
            self._rebind(key, lazy=True)

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
            self._steps.clear()  # a new N for every context
            self._storage.clear()
            self._last_key.clear()
            for key in self._bound:
                self._unbind(key)
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
        self._stale.clear()
