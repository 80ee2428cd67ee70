"""Eager execution of a rewritten program: the same graph, run without ``torch.ops``' Python layers.

A captured graph calls every aten op as an ``OpOverload`` (a Python ``__call__`` around the C++ op),
reads each weight through a chain of module attributes, and dispatches each ``torch.cond`` through
the higher-order-op machinery. Eagerly that costs microseconds per node, several milliseconds per
call of a DiT: the untransformed model, whose modules call ``torch`` functions directly, would be
faster than its cached twin on every step it computes.

:func:`eager_module` builds the graph module that eager calls run instead. It runs the same nodes in
the same order on the same tensors with the same kernels, so its outputs are bitwise the original's:

* each ``OpOverload`` target is called through ``OpOverload._op`` (what ``OpOverload.__call__``
  calls);
* each parameter, buffer or submodule a node reads is a flat attribute (the same object);
* each ``torch.cond`` runs the branch its predicate selects, as ``torch.cond``'s eager kernel does
  (which reads the predicate on the host too); the branch graphs get their own eager modules.

``torch.compile``, export and any other tracing (a dispatch mode such as ``FakeTensorMode`` or
``make_fx``, a functorch transform) keep using the program's ``graph_module`` (:func:`plain_eager`): the
eager module is built from it, lazily, and rebuilt when a program hook changes it
(:class:`~adacache_fx.module.Program`).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

_cond = torch.ops.higher_order.cond


def plain_eager() -> bool:
    """Whether a call runs on real tensors with nothing tracing it: no compiler, no dispatch mode, no
    functorch transform (those need ``torch.cond`` and the ``OpOverload`` targets of the graph module)."""
    return not (torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
                or torch._C._functorch.peek_interpreter_stack() is not None)


def run_cond(pred, true_fn, false_fn, operands):
    """``torch.cond``'s eager semantics without its dispatch: the selected branch on the operands."""
    return true_fn(*operands) if pred else false_fn(*operands)


class _Op:
    """Stands for an ``OpOverload`` during code generation (fx names it as a global); the generated
    module's globals then hold ``op._op`` itself under that name."""

    def __init__(self, op: torch._ops.OpOverload, index: int):
        self.op = op
        self.__name__ = f"{op._opname}_{op._overloadname}_{index}"
        self.__module__ = __name__

    def __call__(self, *args, **kwargs):  # only if a module is generated without :func:`_bind_ops`
        return self.op(*args, **kwargs)


def _attribute(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _generated_globals(module: nn.Module):
    """The globals of the generated code of every graph module under ``module`` (fx generates one class,
    with its own globals, per module; building a parent regenerates its children's code)."""
    return (type(m).forward.__globals__ for m in module.modules() if isinstance(m, fx.GraphModule))


def _bind_ops(module: nn.Module) -> None:
    """Put ``op._op`` in place of each stand-in, in every graph module under ``module``."""
    for namespace in _generated_globals(module):
        for name, value in list(namespace.items()):
            if isinstance(value, _Op):
                namespace[name] = value.op._op


def bound(module: nn.Module) -> bool:
    """Whether no stand-in is left in the generated code of any graph module under ``module``."""
    return not any(isinstance(value, _Op) for namespace in _generated_globals(module) for value in namespace.values())


def eager_module(gm: fx.GraphModule) -> fx.GraphModule:
    """The eager twin of ``gm`` (module doc): same nodes, same tensors, fewer Python layers."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen  # the same calling convention (positional, or export's pytree)
    holder = nn.Module()
    names: dict[str, str] = {}
    ops: dict[torch._ops.OpOverload, _Op] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            if node.target not in names:
                names[node.target] = f"n{len(names)}_{node.target.replace('.', '_')}"
                value = _attribute(gm, node.target)
                if isinstance(value, fx.GraphModule):
                    value = eager_module(value)
                if isinstance(value, nn.Parameter):
                    holder.register_parameter(names[node.target], value)
                elif isinstance(value, torch.Tensor):
                    holder.register_buffer(names[node.target], value)
                else:
                    setattr(holder, names[node.target], value)
            node.target = names[node.target]
        elif node.op == "call_function" and node.target is _cond:
            node.target = run_cond
        elif node.op == "call_function" and type(node.target) is torch._ops.OpOverload:  # not TorchBind ops
            node.target = ops.setdefault(node.target, _Op(node.target, len(ops)))
    module = fx.GraphModule(holder, graph, class_name=f"Eager{type(gm).__name__}")
    _bind_ops(module)
    return module
