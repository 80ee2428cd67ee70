"""``capture``: one call of the model exported with ``torch.export`` (non-strict), retried until exact.

Attempts, each starting from the model as the user handed it over (:class:`~adacache_fx.snapshot.ModelSnapshot`):

1. the export as is, with the top-level Python int arguments as symbolic inputs (a timestep passed as
   an int changes every step); an int the forward uses as a size or in a branch stays a constant;
2. on a data-dependent failure, or a graph that reads a tensor on the host, the tensor inputs of at most
   :data:`SPECIALIZE_MAX_NUMEL` elements specialized (:mod:`.static`), then only those the forward
   reads on the host;
3. with input-independent tensors folded, when the trace leaves a tensor it computed outside the graph.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

from ..snapshot import ModelSnapshot
from .errors import (
    CaptureError,
    brief,
    capture_message,
    is_data_dependent,
    untraced_message,
    user_line,
    without_partial_graphs,
)
from .graph import CapturedGraph, named_leaves, strip_export_wrappers
from .hooks import traceable_hooks
from .static import StaticEvaluation, reads_on_host

logger = logging.getLogger("adacache_fx.capture")

#: Tensor inputs specialized automatically (read on the host) have at most this many elements: masks,
#: position ids, sizes and flags, not latents or text embeddings at real sizes.
SPECIALIZE_MAX_NUMEL = 1 << 16


def capture(
    model: torch.nn.Module, args: tuple, kwargs: dict, functional: bool = False, static_inputs=(), fold: bool = False,
    static_scalars=(), dynamic_shapes=None,
) -> CapturedGraph:
    """Export ``model(*args, **kwargs)`` and return a clean GraphModule over the flat inputs.

    The result has plain positional placeholders (one per flattened input, non-tensors included),
    returns a flat tuple, and shares its parameters and buffers with ``model``. The export's input
    guard module and pytree codegen are removed so that ``torch.compile`` can trace it. The model is
    left as it was found (see :mod:`adacache_fx.snapshot`).

    ``functional=True`` also functionalizes the graph (no op is decomposed): in-place updates, like a
    rotary embedding written into slices of ``empty_like``, become data edges. Regions cut *inside* a
    block need that; whole-block regions keep such updates inside the region, and the non-functional
    graph runs about 10% faster in eager mode (compile and ONNX export functionalize anyway). A forward
    that writes a buffer (a lazy cache) is always functionalized: each write is then one ``copy_`` into
    the buffer at the end of the graph, from a value the graph computes (see ``hoist_buffer_writes``).

    ``static_inputs`` names tensor inputs to specialize (more may be found), ``fold=True`` evaluates
    input-independent tensors eagerly from the start, ``static_scalars`` names int arguments to keep
    constant. ``dynamic_shapes`` (``torch.export``'s, by argument name) makes tensor sizes symbolic.
    The result says what was specialized, folded and traced: pass it to the next capture.
    """
    with traceable_hooks(model):
        return _capture(model, args, kwargs, functional, static_inputs, fold, static_scalars, dynamic_shapes)


def _capture(model, args, kwargs, functional, static_inputs, fold, static_scalars, dynamic_shapes=None):
    exporter = _Exporter(model, args, kwargs, fold, static_scalars, dynamic_shapes)
    static = [name for name in exporter.tensors if name in static_inputs]
    try:
        program, failure = exporter(static), None
    except CaptureError:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with context
        if not is_data_dependent(error):
            raise CaptureError(capture_message(exporter.name, error)) from error
        program, failure = None, error
    if failure is not None or reads_on_host(program):
        program, static = _specialize(exporter, program, failure, static)
    if functional or exporter.written:  # written buffers: one write each at the end of the graph
        with torch.no_grad():
            program = program.run_decompositions({})
    gm = strip_export_wrappers(program.module())
    traced = tuple(n for n in exporter.ints if n not in exporter.static_scalars)
    return CapturedGraph(gm, program.call_spec.in_spec, program.call_spec.out_spec, tuple(static), exporter.fold,
                         traced, tuple(exporter.static_scalars))


def _specialize(exporter: _Exporter, program, failure: BaseException | None, static: list[str]):
    """Export again with the small tensor inputs specialized; keep those the model reads on the host.

    ``failure`` is the data-dependent error of the first export; without one, ``program`` is a first
    export that reads tensors on the host inside its graph (kept if specializing does not help)."""
    name = exporter.name
    candidates = [n for n, t in exporter.tensors.items() if n not in static and t.numel() <= SPECIALIZE_MAX_NUMEL]
    if not candidates:
        if failure is None:
            return program, static
        raise CaptureError(capture_message(name, failure, f"no input has at most {SPECIALIZE_MAX_NUMEL} elements "
                                                          f"that could be specialized (specialized: {static})"))
    try:
        specialized = exporter(static + candidates)
    except CaptureError:
        raise
    except Exception as error:  # noqa: BLE001 - reported with what was tried
        if failure is None:
            logger.debug("%s: specializing %s did not remove the host reads: %s", name, candidates, brief(error))
            return program, static
        line = user_line(error)
        raise CaptureError(capture_message(
            name, failure, f"the export was retried with the inputs {static + candidates} specialized to their "
            f"values, and failed again{f' at {line}' if line else ''}: {brief(error)}",
        )) from error
    found = [n for n in candidates if n in exporter.read]
    if not found and failure is None:  # the graph's host reads are not of inputs
        return program, static
    if not found:  # no input read: the values read were input-independent (a buffer's)
        try:
            exporter.fold = True
            return exporter(static), static
        except Exception as error:  # noqa: BLE001 - keep every candidate specialized
            exporter.fold = False
            logger.debug("%s: folding alone failed (%s); keeping %s", name, brief(error), candidates)
            found = candidates
    if found and found != candidates:
        try:  # the other candidates stay inputs of the graph
            specialized, candidates = exporter(static + found), found
        except Exception as error:  # noqa: BLE001 - keep every candidate specialized
            logger.debug("%s: specializing only %s failed (%s); keeping %s", name, found, brief(error), candidates)
    logger.debug("%s: specialized the inputs %s to their values (read on the host: %s)", name, candidates, found)
    return specialized, static + candidates


class _Exporter:
    """Runs ``torch.export`` on one call with given inputs specialized; retries with input-independent
    tensors folded when the trace leaves fake tensors among the constants, and with the int arguments
    constant when the forward sizes or branches on them."""

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: dict, fold: bool, static_scalars=(),
                 dynamic_shapes=None):
        self.model, self.args, self.kwargs, self.fold = model, tuple(args), dict(kwargs), fold
        self.shapes = dict(dynamic_shapes or {})
        self.name = type(model).__name__
        self.named = named_leaves(self.args, self.kwargs)
        self.tensors = {n: leaf for n, leaf in self.named if isinstance(leaf, torch.Tensor)}
        self.ints = _int_arguments(model, self.args, self.kwargs)
        self.static_scalars = [n for n in self.ints if n in static_scalars]
        self.read: set[str] = set()  # the static inputs the last export read on the host
        self.written: list[str] = []  # the buffers the last export's forward wrote in place
        # Every attempt starts from the model as the user handed it over and leaves it so.
        self.snapshot = ModelSnapshot.take(model)

    def __call__(self, static: list[str]):
        program, fakes = self._export_ints(static)
        if fakes and not self.fold:
            logger.debug("%s: %s computed outside the trace; evaluating input-independent tensors eagerly",
                         self.name, fakes)
            self.fold = True
            program, fakes = self._export_ints(static)
        if fakes:
            raise CaptureError(untraced_message(self.model, fakes))
        return program

    def _export_ints(self, static: list[str]):
        """Export with the int arguments not known to be constant as symbolic inputs; those the forward
        turns into sizes or guards on become constant (remembered in :attr:`static_scalars`)."""
        dynamic = [n for n in self.ints if n not in self.static_scalars]
        if not dynamic:
            return self._export(static, [])
        try:
            program, fakes = self._export(static, dynamic)
        except Exception as error:  # noqa: BLE001 - if constant ints export, the forward needs them constant
            try:
                result = self._export(static, [])
            except Exception:  # noqa: BLE001 - not the ints' fault: report the first failure
                raise error from None
            logger.debug("%s: the int arguments %s cannot be symbolic (%s)", self.name, dynamic, brief(error))
            self.static_scalars += dynamic
            return result
        sized = _sizing_ints(program, dynamic)
        if sized:
            logger.debug("%s: the int arguments %s size tensors: constant", self.name, sized)
            self.static_scalars += sized
            return self._export_ints(static)
        return program, fakes

    def _export(self, static: list[str], dynamic: list[str]):
        # The static inputs enter as marker strings (a placeholder each, left unused); a pre-hook
        # swaps the real tensors in and starts evaluating them eagerly for the forward's duration.
        markers = {f"adacache_fx.static:{n}": self.tensors[n] for n in static}
        flat, spec = pytree.tree_flatten((self.args, self.kwargs))
        flat = [f"adacache_fx.static:{n}" if n in static else leaf for (n, _), leaf in zip(self.named, flat)]
        args, kwargs = pytree.tree_unflatten(flat, spec)
        fold = self.fold or bool(static)  # what the static values compute may be cached by the model
        mode = StaticEvaluation({n: self.tensors[n] for n in static}, fold)
        buffers = dict(self.model.named_buffers())
        versions: dict[str, tuple[torch.Tensor, int]] = {}

        def enter(module, call_args, call_kwargs):
            call = pytree.tree_map(lambda leaf: markers.get(leaf, leaf) if isinstance(leaf, str) else leaf,
                                   (call_args, call_kwargs))
            versions.update((name, (b, b._version)) for name, b in module.named_buffers())
            if fold:  # the export swapped fake buffers in: evaluate with the real ones
                for name, fake in module.named_buffers():
                    if name in buffers and fake is not buffers[name]:
                        mode.sources[id(fake)] = (fake, frozenset())
                        mode.real[id(fake)] = buffers[name]
                mode.__enter__()
            return call

        def leave(module, call_args, output):
            if fold:
                mode.__exit__(None, None, None)
            self.written = [name for name, (b, version) in versions.items() if b._version != version]

        handles = [self.model.register_forward_pre_hook(enter, with_kwargs=True, prepend=True),
                   self.model.register_forward_hook(leave, always_call=True)]
        program = None
        try:
            with torch.no_grad(), warnings.catch_warnings(), without_partial_graphs(), torch._export.config.patch(
                error_on_lifted_constant_tensors=False
            ):
                warnings.filterwarnings("ignore", message="We found a fake tensor in the exported program")
                program = torch.export.export(self.model, args, kwargs, strict=False,
                                              dynamic_shapes=self._dynamic_shapes(args, kwargs, dynamic))
        finally:
            for handle in handles:
                handle.remove()
            self._restore(program)
        self.read = mode.read
        fakes = [n for n, value in program.constants.items() if isinstance(value, FakeTensor)]
        return program, fakes

    def _dynamic_shapes(self, args: tuple, kwargs: dict, dynamic: list[str]):
        """``torch.export``'s ``dynamic_shapes``, by parameter name: the ``dynamic`` int arguments and the
        tensor sizes the caller made symbolic."""
        if not dynamic and not self.shapes:
            return None
        bound = inspect.signature(self.model.forward).bind(*args, **kwargs).arguments
        dim = torch.export.Dim.DYNAMIC
        return {name: (dim if name in dynamic else self.shapes[name] if name in self.shapes
                       else pytree.tree_map(lambda _: None, value)) for name, value in bound.items()}

    def _restore(self, program) -> None:
        """Put the model back as it was before the attempt. A constant of the program that views a buffer
        the trace wrote (a lazy cache filled while evaluated eagerly) keeps the value it had: a copy."""
        written = {b.untyped_storage().data_ptr() for b in self.snapshot.written_buffers()}
        if program is not None and written:
            for name, value in program.constants.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) \
                        and value.untyped_storage().data_ptr() in written:
                    program.constants[name] = value.clone()
        left = self.snapshot.restore()
        if left:
            raise CaptureError(f"adacache_fx could not capture {self.name} without changing it: its forward wrote "
                               f"{', '.join(left)} while it was traced, which cannot be undone. What you can do: "
                               "compute that value outside the forward, or keep it in a buffer.")


def _int_arguments(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """The forward's parameters passed a Python int (not a bool) at the top level of the call."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return []
    params = inspect.signature(model.forward).parameters
    return [name for name, value in bound.items() if type(value) is int
            and params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def _sizing_ints(program, dynamic: list[str]) -> list[str]:
    """The symbolic int inputs of ``program`` that appear in a tensor's shape."""
    symbols = {}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in dynamic and isinstance(node.meta.get("val"), torch.SymInt):
            symbols[node.name] = node.meta["val"].node.expr.free_symbols
    sized = set()
    for node in program.graph.nodes:
        value = node.meta.get("val")
        for tensor in pytree.tree_leaves(value):
            if isinstance(tensor, torch.Tensor):
                shape_symbols = set().union(*(getattr(s, "node", None) and s.node.expr.free_symbols or set()
                                               for s in tensor.shape if isinstance(s, torch.SymInt)))
                sized |= {name for name, syms in symbols.items() if syms & shape_symbols}
    return [n for n in dynamic if n in sized]
