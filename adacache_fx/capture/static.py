"""Evaluate eagerly, inside a trace, what depends only on values the capture treats as constants.

:class:`StaticEvaluation` is a ``TorchFunctionMode`` active while ``torch.export`` runs the forward. A
torch function whose tensor arguments are all *static* (a specialized input, something computed from
static values alone, and with ``fold`` a buffer or a tensor made without tensor arguments) runs on the
real values, outside the trace: its result is a constant of the graph. Three things keep that exact:

* reads: which specialized inputs the forward reads on the host is recorded (:attr:`read`), so the
  capture keeps only those specialized;
* writes: a buffer the forward writes (a lazy cache) stops being static at the write, so the trace
  records the write and later reads see the written value, not the real buffer's old one;
* indices: a boolean mask computed from static values, used to index a traced tensor (``x[mask]``), is
  replaced by its integer indices (``mask.nonzero(as_tuple=True)``), and a static tensor bounding a
  slice (``x[:, :lengths[0]]``) by its int, so the result has a known size instead of a data-dependent
  one; both count as reads on the host.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

HOST_READS = frozenset({
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.__int__,
    torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.__format__,
})
HOST_READ_OPS = (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default)
_RANDOM = frozenset({
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.normal, torch.bernoulli, torch.multinomial, torch.poisson, torch.Tensor.random_, torch.Tensor.uniform_,
    torch.Tensor.normal_, torch.Tensor.bernoulli_, torch.Tensor.exponential_, torch.Tensor.cauchy_,
    torch.Tensor.geometric_, torch.Tensor.log_normal_,
})
_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)
_INDEXING = (torch.Tensor.__getitem__, torch.Tensor.__setitem__)


class StaticEvaluation(TorchFunctionMode):
    """See the module docstring. ``inputs``: the specialized inputs by name; :attr:`real` maps the
    export's fake buffers to the real ones (filled by the exporter when ``fold``)."""

    def __init__(self, inputs: dict[str, torch.Tensor], fold: bool):
        super().__init__()
        self.fold = fold
        self.sources = {id(t): (t, frozenset([n])) for n, t in inputs.items()}  # id -> (tensor, inputs)
        self.read: set[str] = set()
        self.real: dict[int, torch.Tensor] = {}

    def _static(self, tensor) -> bool:
        known = self.sources.get(id(tensor))
        return known is not None and known[0] is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = [t for t in mutated(func, args, kwargs) if id(t) in self.real]
        if written:  # a buffer written in the forward (a lazy cache): the trace records the write, and
            for buffer in written:  # later reads see the written value, not the real buffer's
                self.sources.pop(id(buffer), None)
                self.real.pop(id(buffer), None)
            return func(*args, **kwargs)
        leaves = pytree.tree_leaves((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if (
            (tensors or self.fold)
            and all(self._static(t) for t in tensors)
            and not any(isinstance(leaf, _SYMBOLIC) for leaf in leaves)
            and func not in _RANDOM
        ):
            inputs = frozenset().union(*(self.sources[id(t)][1] for t in tensors))
            if func in HOST_READS:
                self.read |= inputs
            if self.real:
                args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: self.real.get(id(t), t), (args, kwargs))
            with _disable_current_modes():
                out = func(*args, **kwargs)
            for leaf in pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.sources[id(leaf)] = (leaf, inputs)
            return out
        if func in _INDEXING and len(args) >= 2:
            args = (args[0], self._static_index(args[1]), *args[2:])
        return func(*args, **kwargs)

    def _static_index(self, index):
        """``index`` with every static boolean mask replaced by its integer indices and every static
        tensor in a slice (``x[:, :lengths[0]]``) by its Python int; both are host reads of it."""
        items = index if isinstance(index, tuple) else (index,)
        converted, changed = [], False
        for item in items:
            if isinstance(item, torch.Tensor) and item.dtype == torch.bool and self._static(item):
                self.read |= self.sources[id(item)][1]  # its values decide a size
                with _disable_current_modes():
                    converted.extend(self.real.get(id(item), item).nonzero(as_tuple=True))
                changed = True
            elif isinstance(item, slice) and any(self._static(b) for b in (item.start, item.stop, item.step)):
                converted.append(slice(*(self._host_int(b) for b in (item.start, item.stop, item.step))))
                changed = True
            else:
                converted.append(item)
        return tuple(converted) if changed else index

    def _host_int(self, bound):
        if not self._static(bound):
            return bound
        self.read |= self.sources[id(bound)][1]
        with _disable_current_modes():
            return int(self.real.get(id(bound), bound))


def mutated(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
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


def reads_on_host(program) -> bool:
    """Whether an exported program's graph reads a tensor's value on the host (``aten.item``) or has
    sizes that depend on values (``x[mask]``, ``nonzero``: unbacked symbols)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return any(node.op == "call_function" and (node.target in HOST_READ_OPS or free_unbacked_symbols(node.meta.get("val")))
               for node in program.graph.nodes)
