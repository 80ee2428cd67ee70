"""Capture: turn a model call into a flat fx graph with ``torch.export`` (non-strict).

``torch.fx.symbolic_trace`` fails on diffusers transformers; non-strict ``torch.export`` captures them
with ``nn_module_stack`` metadata on every node, which the passes use to find the block stack.

Two things ``torch.export`` cannot trace are evaluated eagerly instead, on real values:

* *static inputs*: small input tensors whose values the model reads on the host (``.item()``,
  ``.tolist()``, ``int(t)``, ``if t > 0``) to size or choose something. Their values become
  constants of the capture and part of its :func:`signature`, like a shape. They are named by
  ``AdaCacheConfig(static_inputs=...)``, or found: when the export fails on a data-dependent guard
  or its graph reads a tensor on the host, the scalar and short vector inputs are specialized and
  those the model reads on the host are kept (logged at debug level on ``adacache_fx.capture``).
* *input-independent tensors*, when the trace leaves a tensor it computed outside the graph (a
  buffer rebuilt through ``.data`` for a new input size, as diffusers' CogVideoX positional
  embedding does): the export is retried with every tensor made without inputs (``arange``,
  ``zeros``...) and everything computed from such tensors alone evaluated eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

from .snapshot import ModelSnapshot

logger = logging.getLogger("adacache_fx.capture")

#: Inputs specialized automatically are scalars and vectors of at most this many elements.
SMALL_NUMEL = 16


def data_dependent_errors() -> tuple[type[BaseException], ...]:
    """What ``torch.export`` raises when Python code needs a value the trace does not have (imported on
    first use: ``symbolic_shapes`` loads sympy, which ``import adacache_fx`` should not)."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, PendingUnbackedSymbolNotFound

    return (GuardOnDataDependentSymNode, PendingUnbackedSymbolNotFound, DataDependentOutputException,
            DynamicOutputShapeException)


_HOST_READS = frozenset({
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.__int__,
    torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.__format__,
})
_HOST_READ_OPS = (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default)
_RANDOM = frozenset({
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.normal, torch.bernoulli, torch.multinomial, torch.poisson, torch.Tensor.random_, torch.Tensor.uniform_,
    torch.Tensor.normal_, torch.Tensor.bernoulli_, torch.Tensor.exponential_, torch.Tensor.cauchy_,
    torch.Tensor.geometric_, torch.Tensor.log_normal_,
})
_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


@dataclass
class CapturedGraph:
    """A captured call: a GraphModule over flat inputs, and the specs to (un)flatten a real call.

    ``static_inputs`` names the inputs whose values are constants of the graph (their placeholders
    are unused); ``folded`` says whether input-independent tensors were evaluated eagerly.
    """

    graph_module: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    static_inputs: tuple[str, ...] = ()
    folded: bool = False

    def flatten_inputs(self, args: tuple, kwargs: dict) -> list:
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise ValueError(f"call structure changed since capture: {spec} != {self.in_spec}")
        return flat

    def unflatten_outputs(self, flat_outputs) -> Any:
        return pytree.tree_unflatten(list(flat_outputs), self.out_spec)


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_leaves(args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """The flat leaves of a call ``(args, kwargs)`` with readable names: ``hidden_states``, ``arg0``,
    ``added_cond_kwargs.resolution``. Falls back to ``input_{i}`` for containers without key paths."""
    try:
        paths, _ = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    except ValueError:
        return [(f"input_{i}", leaf) for i, leaf in enumerate(pytree.tree_leaves((tuple(args), dict(kwargs))))]
    named = []
    for path, leaf in paths:
        head, rest = path[1], path[2:]
        first = f"arg{_key_name(head)}" if _key_name(path[0]) == "0" else _key_name(head)
        named.append((".".join([first, *(_key_name(k) for k in rest)]), leaf))
    return named


def signature(args: tuple, kwargs: dict, static_inputs=()) -> tuple:
    """A hashable key of a call: tree structure, tensor shapes/dtypes/devices, non-tensor values, and
    the values of the tensors named in ``static_inputs`` (read on the host: call it eagerly).

    ``torch.export`` specializes on all of these, so a new key needs a new capture.
    """
    flat, spec = pytree.tree_flatten((args, kwargs))
    names = [name for name, _ in named_leaves(args, kwargs)] if static_inputs else [None] * len(flat)
    leaves = []
    for name, leaf in zip(names, flat):
        if isinstance(leaf, torch.Tensor):
            entry = ("T", tuple(leaf.shape), leaf.dtype, leaf.device.type)
            leaves.append(entry + (tuple(leaf.reshape(-1).tolist()),) if name in static_inputs else entry)
        else:
            leaves.append(("V", repr(leaf)))
    return (str(spec), tuple(leaves))


def capture(
    model: torch.nn.Module, args: tuple, kwargs: dict, functional: bool = False, static_inputs=(), fold: bool = False
) -> CapturedGraph:
    """Export ``model(*args, **kwargs)`` and return a clean GraphModule over the flat inputs.

    The result has plain positional placeholders (one per flattened input, non-tensors included),
    returns a flat tuple, and shares its parameters and buffers with ``model``. The export's input
    guard module and pytree codegen are removed so that ``torch.compile`` can trace it.

    ``functional=True`` also functionalizes the graph (no op is decomposed): in-place updates, like a
    rotary embedding written into slices of ``empty_like``, become data edges. Regions cut *inside* a
    block need that; whole-block regions keep such updates inside the region, and the non-functional
    graph runs about 10% faster in eager mode (compile and ONNX export functionalize anyway). A forward
    that writes a buffer (a lazy cache) is always functionalized: each write is then one ``copy_`` into
    the buffer at the end of the graph, from a value the graph computes (see ``hoist_buffer_writes``).

    ``static_inputs`` names tensor inputs to specialize (see the module docstring; more may be
    found), ``fold=True`` evaluates input-independent tensors eagerly from the start. The result says
    which inputs were specialized and whether tensors were folded: pass them to the next capture.
    """
    exporter = _Exporter(model, args, kwargs, fold)
    static = [name for name in exporter.tensors if name in static_inputs]
    try:
        program, failure = exporter(static), None
    except CaptureError:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with context
        if not _data_dependent(error):
            raise CaptureError(_message(exporter.name, error)) from error
        program, failure = None, error
    if failure is not None or _reads_on_host(program):
        program, static = _specialize(exporter, program, failure, static)
    if functional or exporter.written:  # written buffers: one write each at the end of the graph
        with torch.no_grad():
            program = program.run_decompositions({})
    gm = _strip_export_wrappers(program.module())
    return CapturedGraph(gm, program.call_spec.in_spec, program.call_spec.out_spec, tuple(static), exporter.fold)


def _specialize(exporter: _Exporter, program, failure: BaseException | None, static: list[str]):
    """Export again with the small tensor inputs specialized; keep those the model reads on the host.

    ``failure`` is the data-dependent error of the first export; without one, ``program`` is a first
    export that reads tensors on the host inside its graph (kept if specializing does not help)."""
    name = exporter.name
    candidates = [n for n, t in exporter.tensors.items() if n not in static and t.dim() <= 1 and t.numel() <= SMALL_NUMEL]
    if not candidates:
        if failure is None:
            return program, static
        raise CaptureError(_message(name, failure, f"no input is a scalar or a vector of at most {SMALL_NUMEL} "
                                                   f"elements that could be specialized (specialized: {static})"))
    try:
        specialized = exporter(static + candidates)
    except CaptureError:
        raise
    except Exception as error:  # noqa: BLE001 - reported with what was tried
        if failure is None:
            logger.debug("%s: specializing %s did not remove the host reads: %s", name, candidates, _brief(error))
            return program, static
        raise CaptureError(_message(
            name, failure, f"the export was retried with the inputs {static + candidates} specialized to their "
            f"values, and failed again: {_brief(error)}",
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
            logger.debug("%s: folding alone failed (%s); keeping %s", name, _brief(error), candidates)
            found = candidates
    if found and found != candidates:
        try:  # the other candidates stay inputs of the graph
            specialized, candidates = exporter(static + found), found
        except Exception as error:  # noqa: BLE001 - keep every candidate specialized
            logger.debug("%s: specializing only %s failed (%s); keeping %s", name, found, _brief(error), candidates)
    logger.debug("%s: specialized the inputs %s to their values (read on the host: %s)", name, candidates, found)
    return specialized, static + candidates


class _Exporter:
    """Runs ``torch.export`` on one call with given inputs specialized; retries with input-independent
    tensors folded when the trace leaves fake tensors among the constants."""

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: dict, fold: bool):
        self.model, self.args, self.kwargs, self.fold = model, tuple(args), dict(kwargs), fold
        self.name = type(model).__name__
        self.named = named_leaves(self.args, self.kwargs)
        self.tensors = {n: leaf for n, leaf in self.named if isinstance(leaf, torch.Tensor)}
        self.read: set[str] = set()  # the static inputs the last export read on the host
        self.written: list[str] = []  # the buffers the last export's forward wrote in place
        # Every attempt starts from the model as the user handed it over and leaves it so.
        self.snapshot = ModelSnapshot.take(model)

    def __call__(self, static: list[str]):
        program, fakes = self._export(static)
        if fakes and not self.fold:
            logger.debug("%s: %s computed outside the trace; evaluating input-independent tensors eagerly",
                         self.name, fakes)
            self.fold = True
            program, fakes = self._export(static)
        if fakes:
            raise CaptureError(_untraced_message(self.model, fakes))
        return program

    def _export(self, static: list[str]):
        # The static inputs enter as marker strings (a placeholder each, left unused); a pre-hook
        # swaps the real tensors in and starts evaluating them eagerly for the forward's duration.
        markers = {f"adacache_fx.static:{n}": self.tensors[n] for n in static}
        flat, spec = pytree.tree_flatten((self.args, self.kwargs))
        flat = [f"adacache_fx.static:{n}" if n in static else leaf for (n, _), leaf in zip(self.named, flat)]
        args, kwargs = pytree.tree_unflatten(flat, spec)
        fold = self.fold or bool(static)  # what the static values compute may be cached by the model
        mode = _StaticEvaluation({n: self.tensors[n] for n in static}, fold)
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
        try:
            with torch.no_grad(), warnings.catch_warnings(), _without_partial_graphs(), torch._export.config.patch(
                error_on_lifted_constant_tensors=False
            ):
                warnings.filterwarnings("ignore", message="We found a fake tensor in the exported program")
                program = torch.export.export(self.model, args, kwargs, strict=False)
        finally:
            for handle in handles:
                handle.remove()
            self._restore(locals().get("program"))
        self.read = mode.read
        fakes = [n for n, value in program.constants.items() if isinstance(value, FakeTensor)]
        return program, fakes

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


class _StaticEvaluation(TorchFunctionMode):
    """Evaluate eagerly, on real values, every torch function whose tensor arguments are all static:
    specialized inputs, what is computed from them alone, and with ``fold`` tensors made without
    tensor arguments and buffers (:attr:`real` maps the export's fake buffers to the real ones).
    Records the inputs whose values are read on the host (:attr:`read`)."""

    def __init__(self, inputs: dict[str, torch.Tensor], fold: bool):
        super().__init__()
        self.fold = fold
        self.sources = {id(t): (t, frozenset([n])) for n, t in inputs.items()}  # id -> (tensor, inputs)
        self.read: set[str] = set()
        self.real: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        sources = [self.sources.get(id(t), (None, None)) for t in tensors]
        written = [t for t in _mutated(func, args, kwargs) if id(t) in self.real]
        if written:  # a buffer written in the forward (a lazy cache): the trace records the write, and
            for buffer in written:  # later reads see the written value, not the real buffer's
                self.sources.pop(id(buffer), None)
                self.real.pop(id(buffer), None)
            return func(*args, **kwargs)
        if (
            (tensors or self.fold)
            and all(known is t for (known, _), t in zip(sources, tensors))
            and not any(isinstance(leaf, _SYMBOLIC) for leaf in leaves)
            and func not in _RANDOM
        ):
            inputs = frozenset().union(*(names for _, names in sources))
            if func in _HOST_READS:
                self.read |= inputs
            if self.real:
                args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: self.real.get(id(t), t), (args, kwargs))
            with _disable_current_modes():
                out = func(*args, **kwargs)
            for leaf in pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.sources[id(leaf)] = (leaf, inputs)
            return out
        return func(*args, **kwargs)


class _DropPartialGraphs:
    """``sys.stderr`` without the partial graph ``torch.export`` prints before raising: an attempt that
    fails is expected here (the retries), and the error that matters is raised with context."""

    def __init__(self, stream):
        self.stream, self.dropped = stream, False

    def write(self, text):
        dropped, self.dropped = self.dropped, text.lstrip().startswith("def forward(")
        if self.dropped or (dropped and not text.strip()):  # the graph, and the line end print adds
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _without_partial_graphs():
    stream = sys.stderr
    sys.stderr = _DropPartialGraphs(stream)
    try:
        yield
    finally:
        sys.stderr = stream


def _mutated(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors a torch function writes in place: ``self`` of an in-place method or ``__setitem__``,
    ``out=``."""
    name = getattr(func, "__name__", "")
    written = []
    if args and isinstance(args[0], torch.Tensor) and (
        name == "__setitem__" or (name.endswith("_") and not name.startswith("__")) or name.startswith("__i")
    ):
        written.append(args[0])
    out = kwargs.get("out")
    written += [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return written


def _data_dependent(error: BaseException | None) -> bool:
    errors = data_dependent_errors()
    while error is not None:
        if isinstance(error, errors):
            return True
        error = error.__cause__ or error.__context__
    return False


def _reads_on_host(program) -> bool:
    return any(node.op == "call_function" and node.target in _HOST_READ_OPS for node in program.graph.nodes)


def _brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def _message(name: str, error: BaseException, tried: str | None = None) -> str:
    op = _failing_op(error)
    return (
        f"adacache_fx could not capture {name} with torch.export(strict=False){f' at {op}' if op else ''}: "
        f"{_brief(error)}\n"
        + (f"Tried: {tried}.\n" if tried else "")
        + "What you can do: make the forward traceable by torch.export (see the error above; data-dependent "
        "Python control flow is the usual cause), name the small inputs it reads on the host in "
        "AdaCacheConfig(static_inputs=...), or transform the submodule that holds the transformer blocks "
        "instead of the whole model."
    )


def _untraced_message(model: torch.nn.Module, fakes: list[str]) -> str:
    sites = []
    for const in fakes:
        path = const.rpartition(".")[0]
        module = model.get_submodule(path)
        buffers = [n for n, _ in module.named_buffers(recurse=False)]
        sites.append(f"{const} in module {path or '(root)'} ({type(module).__name__}, buffers {buffers})")
    return (
        f"adacache_fx could not capture {type(model).__name__}: its forward computes tensors that torch.export "
        f"cannot trace, even with input-independent tensors evaluated eagerly: {'; '.join(sites)} (e.g. a "
        "buffer rebuilt through .data for an input size other than the configured one). What you can do: call "
        "the model at the size its config was built for, or compute that tensor outside the forward."
    )


def _strip_export_wrappers(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule without the input guards, hooks and pytree codegen of ``ep.module()``."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()
    output = graph.output_node()
    (outputs,) = output.args
    output.args = (tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,),)
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__.split(".")[-1])


def _failing_op(error: BaseException) -> str | None:
    text = str(error)
    for marker in ("aten.", "torch.ops."):
        at = text.find(marker)
        if at >= 0:
            return text[at:].split()[0].rstrip(",.:)")
    return None
