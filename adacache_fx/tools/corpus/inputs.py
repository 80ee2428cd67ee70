"""Declarative example inputs: what a configuration feeds its model, as data.

Each spec says how one input is made (shape, dtype, and one of randn / rand / ones / zeros / full / randint /
literal values / arange / coordinate grids / lists / Python values / an object built from a class). The
configurations in :mod:`.configs` are tables of these; :func:`materialize` turns one into real values.

The timestep is a :class:`Timestep`: its values are not fixed but follow the denoising schedule, ``scale *
sigma`` (times a per-element ``ratio``) for the ``sigma`` of the call. Its ``scale`` is the range the
diffusers test draws it from: ``999`` for integer timesteps, ``1000`` for float timesteps drawn from
``[0, 1000)``, ``1.0`` for float timesteps in ``[0, 1]`` (flow-matching models that scale them inside).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Arange", "Cat", "Construct", "Full", "Ids", "ListOf", "Literal", "Ones", "Rand", "Randint", "Randn",
    "Timestep", "Value", "Zeros", "describe", "materialize",
]

_DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool, "int32": torch.int32}


def _dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


@dataclass(frozen=True)
class Randn:
    """Standard normal noise."""

    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class Rand:
    """Uniform noise in [0, 1)."""

    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class Ones:
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class Zeros:
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class Full:
    shape: tuple[int, ...]
    value: float
    dtype: str = "float32"


@dataclass(frozen=True)
class Randint:
    """Integers drawn uniformly from ``[low, high)`` (``dtype`` may be a float type)."""

    low: int
    high: int
    shape: tuple[int, ...]
    dtype: str = "int64"


@dataclass(frozen=True)
class Literal:
    """Fixed values (nested lists)."""

    values: Any
    dtype: str = "int64"


@dataclass(frozen=True)
class Arange:
    start: int
    end: int
    dtype: str = "int64"


@dataclass(frozen=True)
class Ids:
    """Position ids: the Cartesian product of ``arange(n)`` for each ``n`` in ``axes`` (one row per
    position), with a leading batch axis of ``batch`` when given."""

    axes: tuple[int, ...]
    batch: int | None = None
    dtype: str = "int64"


@dataclass(frozen=True)
class Cat:
    """The parts concatenated along ``dim``."""

    parts: tuple
    dim: int = 0


@dataclass(frozen=True)
class ListOf:
    """A Python list of inputs."""

    items: tuple


@dataclass(frozen=True)
class Value:
    """A Python value passed as is (a number, a string, None, a dict or list of plain values)."""

    value: Any


@dataclass(frozen=True)
class Construct:
    """An object made by calling ``target`` (``"module:qualname"``) with ``args``, fresh for each call."""

    target: str
    args: tuple = ()


@dataclass(frozen=True)
class Timestep:
    """The timestep: ``scale * sigma * ratio`` for each element (``ratios``, default all 1), rounded for
    integer dtypes. ``python=True``: a Python number instead of a tensor (``shape`` ignored)."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    scale: float = 1.0
    ratios: tuple[float, ...] | None = None
    python: bool = False

    def at(self, sigma: float):
        if self.python:
            value = self.scale * sigma
            return round(value) if self.dtype.startswith("int") else float(value)
        count = 1
        for n in self.shape:
            count *= n
        ratios = self.ratios or (1.0,) * count
        values = torch.tensor([self.scale * sigma * r for r in ratios], dtype=torch.float64).reshape(self.shape)
        if self.dtype.startswith("int"):
            values = values.round()
        return values.to(_dtype(self.dtype))


def _make(spec, generator: torch.Generator, sigma: float):
    if isinstance(spec, Randn):
        return torch.randn(spec.shape, generator=generator, dtype=_dtype(spec.dtype))
    if isinstance(spec, Rand):
        return torch.rand(spec.shape, generator=generator, dtype=_dtype(spec.dtype))
    if isinstance(spec, Ones):
        return torch.ones(spec.shape, dtype=_dtype(spec.dtype))
    if isinstance(spec, Zeros):
        return torch.zeros(spec.shape, dtype=_dtype(spec.dtype))
    if isinstance(spec, Full):
        return torch.full(spec.shape, spec.value, dtype=_dtype(spec.dtype))
    if isinstance(spec, Randint):
        return torch.randint(spec.low, spec.high, spec.shape, generator=generator, dtype=_dtype(spec.dtype))
    if isinstance(spec, Literal):
        return torch.tensor(spec.values, dtype=_dtype(spec.dtype))
    if isinstance(spec, Arange):
        return torch.arange(spec.start, spec.end, dtype=_dtype(spec.dtype))
    if isinstance(spec, Ids):
        grid = torch.cartesian_prod(*(torch.arange(n) for n in spec.axes)).to(_dtype(spec.dtype))
        if len(spec.axes) == 1:
            grid = grid[:, None]
        return grid if spec.batch is None else grid.unsqueeze(0).expand(spec.batch, -1, -1).contiguous()
    if isinstance(spec, Cat):
        return torch.cat([_make(part, generator, sigma) for part in spec.parts], dim=spec.dim)
    if isinstance(spec, ListOf):
        return [_make(item, generator, sigma) for item in spec.items]
    if isinstance(spec, Value):
        import copy

        return copy.deepcopy(spec.value)
    if isinstance(spec, Construct):
        module, _, qualname = spec.target.partition(":")
        target = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
        return target(*spec.args)
    if isinstance(spec, Timestep):
        return spec.at(sigma)
    raise TypeError(f"not an input spec: {spec!r}")


def materialize(inputs: dict, sigma: float = 1.0, seed: int = 0) -> dict:
    """The keyword arguments described by ``inputs`` (name -> spec), the timestep(s) at ``sigma``. Random
    inputs come from one generator seeded with ``seed``, in the order of ``inputs``: every call with the
    same seed gets the same latents, only the timestep changes."""
    generator = torch.Generator().manual_seed(seed)
    return {name: _make(spec, generator, sigma) for name, spec in inputs.items()}


def describe(spec) -> str:
    """A short text for one spec (the ``corpus`` table's input column)."""
    if isinstance(spec, (Randn, Rand, Ones, Zeros)):
        return f"{type(spec).__name__.lower()}{tuple(spec.shape)}" + ("" if spec.dtype == "float32" else f" {spec.dtype}")
    if isinstance(spec, Full):
        return f"full{tuple(spec.shape)}={spec.value}"
    if isinstance(spec, Randint):
        return f"randint[{spec.low},{spec.high}){tuple(spec.shape)}"
    if isinstance(spec, Literal):
        return f"tensor{tuple(torch.tensor(spec.values).shape)} {spec.dtype}"
    if isinstance(spec, Arange):
        return f"arange({spec.start},{spec.end})"
    if isinstance(spec, Ids):
        return f"ids{tuple(spec.axes)}"
    if isinstance(spec, Cat):
        return "cat(" + ", ".join(describe(p) for p in spec.parts) + ")"
    if isinstance(spec, ListOf):
        return "[" + ", ".join(describe(i) for i in spec.items) + "]"
    if isinstance(spec, Value):
        return repr(spec.value)
    if isinstance(spec, Construct):
        return spec.target.rpartition(":")[2] + repr(tuple(spec.args))
    if isinstance(spec, Timestep):
        kind = "python " if spec.python else ""
        return f"timestep {kind}{spec.dtype}{tuple(spec.shape) if not spec.python else ''} x{spec.scale:g}"
    return repr(spec)
