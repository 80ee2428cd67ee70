"""Dynamic shapes: one capture for a range of input sizes (``transform(..., dynamic_shapes=...)``).

:class:`DynamicShapes` holds what the user asked to keep symbolic (``torch.export``'s ``dynamic_shapes`` by
argument name, or ``"auto"``: batch, frames, height and width of the first 5-D tensor argument) and what the
capture kept. A dimension the forward specializes is named in one warning, with the export's reason, and
gets a capture per value as without dynamic shapes. A program with symbolic sizes has state shapes that are
expressions of them (:meth:`~adacache_fx.state.StateLayout.resolve`); :func:`input_sizes` reads their values
from a call, and :class:`SizedKey` keys the state of each concrete size.
"""

from __future__ import annotations

import inspect
import warnings
from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn

from ..steps import user_stacklevel
from .export import capture
from .graph import CapturedGraph, named_leaves


class SizedKey(NamedTuple):
    """The state key of a dynamic-shape program: its signature key and the input sizes bound."""

    key: tuple
    sizes: tuple


def solve_sizes(shapes) -> dict[str, int]:
    """The values of the size symbols in ``shapes``: ``(expressions, sizes)`` pairs, one per tensor, each
    expression an int, a ``torch.SymInt``, a sympy expression or its text (``"2*s33"``), the sizes a call's.
    A symbol is read from a dim that is the symbol itself, then from one expression it is the one unknown of."""
    import sympy

    sizes: dict[str, int] = {}
    pending = []
    for expressions, shape in shapes:
        for d, size in zip(expressions, shape):
            if isinstance(d, int):
                continue
            expr = d.node.expr if isinstance(d, torch.SymInt) else sympy.sympify(d)
            if isinstance(expr, sympy.Symbol):
                sizes[expr.name] = int(size)
            else:
                pending.append((expr, int(size)))
    for expr, size in pending:  # e.g. 2*s25 (a size the model divides by its patch size)
        unknown = [sym for sym in expr.free_symbols if sym.name not in sizes]
        if len(unknown) == 1:
            solved = sympy.solve(expr.subs({sympy.Symbol(k): v for k, v in sizes.items()}) - size, unknown[0])
            if len(solved) == 1 and solved[0].is_Integer:
                sizes[unknown[0].name] = int(solved[0])
    return sizes


def sympy_symbols(expression: str) -> set[str]:
    """The size symbols an expression of them names (``"2*s33" -> {"s33"}``)."""
    import sympy

    return {sym.name for sym in sympy.sympify(expression).free_symbols}


def input_sizes(gm: fx.GraphModule, flat: list) -> dict[str, int]:
    """The values of the symbolic sizes of ``gm``'s inputs in the call ``flat`` (symbol name -> int)."""
    return solve_sizes((node.meta["val"].shape, value.shape)
                       for node, value in zip(gm.graph.find_nodes(op="placeholder"), flat)
                       if isinstance(node.meta.get("val"), torch.Tensor) and isinstance(value, torch.Tensor))


def symbolic_dims(gm: fx.GraphModule) -> list[list[int]]:
    """For each input of ``gm``, the dims whose size is symbolic."""
    return [[d for d, s in enumerate(getattr(node.meta.get("val"), "shape", ())) if isinstance(s, torch.SymInt)]
            for node in gm.graph.find_nodes(op="placeholder")]


def mark_shapes(gm: fx.GraphModule, layout, flat: list, state: dict[str, torch.Tensor]) -> None:
    """Tell Dynamo which sizes of a call of ``gm`` may change without a recompile: the sizes the capture kept
    symbolic (of the inputs, and the state dims that are expressions of them), none of a static capture (its
    automatic dynamic shapes would recompile a static graph as a dynamic one; a new signature gets its own
    capture and compilation instead). Called eagerly before each compiled call."""
    for dims, leaf in zip(symbolic_dims(gm), flat):
        if not isinstance(leaf, torch.Tensor):
            continue
        for d in range(leaf.dim()):
            (torch._dynamo.maybe_mark_dynamic if d in dims else torch._dynamo.mark_static)(leaf, d)
    for spec in layout.specs if layout.symbolic else ():
        dims = [d for d, size in enumerate(spec.shape or ()) if isinstance(size, str)]
        if dims:
            torch._dynamo.maybe_mark_dynamic(state[spec.name], dims)


def auto_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, batch: bool = True) -> dict:
    """``dynamic_shapes="auto"``: batch, frames, height and width (dims 0, 2, 3, 4) of the first 5-D tensor
    argument (the video latent ``[B, C, F, H, W]``), each ``Dim.AUTO`` (kept static where the forward
    specializes it: :meth:`DynamicShapes.capture` warns). ``batch=False``: the batch stays static
    (per-sample decisions keep a state row per video)."""

    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    for name, value in bound.items():
        if isinstance(value, torch.Tensor) and value.dim() == 5:
            return {name: {d: torch.export.Dim.AUTO for d in ((0, 2, 3, 4) if batch else (2, 3, 4))}}
    return {}


def _requested_dims(dynamic_shapes: dict) -> dict[str, tuple[int, ...]]:
    """The tensor dims ``dynamic_shapes`` makes symbolic, by argument name (top-level tensors)."""
    dims = {}
    for name, spec in dynamic_shapes.items():
        if isinstance(spec, dict):
            dims[name] = tuple(sorted(d for d, dim in spec.items() if dim is not None))
        elif isinstance(spec, (list, tuple)):
            dims[name] = tuple(d for d, dim in enumerate(spec) if dim is not None)
    return {name: d for name, d in dims.items() if d}


def _dims_text(dims: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} dim {d}" for name, ds in dims.items() for d in ds)


def _reason(error: BaseException) -> str:
    """The lines of an export error that say which dimension was specialized and where."""
    text = str(error.__cause__ or error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    keep = [line for line in lines if any(w in line for w in ("Constraint", "specializ", "guard", "Not all values",
                                                              "File ", "Dim", "dynamic"))]
    return " | ".join((keep or lines)[:6])[:1200]


def _aliases(model: nn.Module, args: tuple) -> dict[str, str]:
    """The forward's parameter name of each positional leaf name (``arg0`` -> ``hidden_states``)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}
    return {f"arg{i}": name for i, name in enumerate(parameters[:len(args)])}


def _symbolic_dims(gm: fx.GraphModule, args, kwargs, requested, aliases) -> dict[str, tuple[int, ...]]:
    """Of the ``requested`` dims (by the forward's parameter names), those the captured graph's inputs keep
    symbolic, by the call's leaf names (``arg0`` for a tensor passed positionally)."""
    kept = {}
    for (name, _), node in zip(named_leaves(args, kwargs), gm.graph.find_nodes(op="placeholder")):
        fake, wanted = node.meta.get("val"), requested.get(aliases.get(name, name))
        if wanted and isinstance(fake, torch.Tensor):
            dims = tuple(d for d in wanted if d < fake.dim() and isinstance(fake.shape[d], torch.SymInt))
            if dims:
                kept[name] = dims
    return kept


class DynamicShapes:
    """The sizes a model's captures keep symbolic: ``spec`` as the user gave it, ``dims`` as captured."""

    def __init__(self, spec: dict | str | None, batch: bool = True):
        if spec is not None and spec != "auto" and not isinstance(spec, dict):
            raise TypeError(f'dynamic_shapes must be a dict by argument name, "auto" or None, got {spec!r}')
        self.spec = spec
        self.batch = batch  # whether "auto" makes the batch dynamic
        self.dims: dict[str, tuple[int, ...]] = {}  # by argument name, the tensor dims the programs keep symbolic

    def capture(self, model: nn.Module, args, kwargs, **options) -> CapturedGraph:
        """Export the call; with dynamic shapes, its sizes symbolic where the forward allows (a warning
        names each dimension it specializes, and why; those get a capture per value)."""
        shapes = auto_dynamic_shapes(model, args, kwargs, self.batch) if self.spec == "auto" else self.spec
        if not shapes:
            return capture(model, args, kwargs, **options)
        requested = _requested_dims(shapes)
        name = type(model).__name__
        try:
            captured = capture(model, args, kwargs, dynamic_shapes=shapes, **options)
        except Exception as error:  # noqa: BLE001 - a static capture decides whether the sizes were the cause
            captured = capture(model, args, kwargs, **options)
            self.spec, self.dims = None, {}
            warnings.warn(f"adacache_fx: {name} cannot take the sizes {_dims_text(requested)} symbolically, so "
                          f"each input signature gets its own capture: {_reason(error)}", stacklevel=user_stacklevel())
            return captured
        aliases = _aliases(model, args)
        kept = _symbolic_dims(captured.graph_module, args, kwargs, requested, aliases)  # by the call's leaf names
        by_parameter = {aliases.get(n, n): dims for n, dims in kept.items()}
        static = {n: tuple(d for d in dims if d not in by_parameter.get(n, ())) for n, dims in requested.items()}
        static = {n: d for n, d in static.items() if d}
        if static:
            flat = {aliases.get(n, n): leaf for n, leaf in named_leaves(args, kwargs)}
            small = [f"{n} dim {d} is {flat[n].shape[d]}" for n, ds in static.items() for d in ds
                     if isinstance(flat.get(n), torch.Tensor) and flat[n].shape[d] <= 1]
            why = (f"; torch.export specializes a sample size of 0 or 1 ({', '.join(small)}): capture with a size of "
                   "2 or more first" if small else "")
            warnings.warn(f"adacache_fx: {name}'s forward specializes {_dims_text(static)} (the export traced them "
                          f"as constants{why}): each of their values gets its own capture", stacklevel=user_stacklevel())
        self.dims = kept
        if not kept:
            self.spec = None
        return captured
