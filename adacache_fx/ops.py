"""Custom ops used by the rewritten graph.

``layout_barrier``: Inductor lowers the operands of a ``torch.cond`` without fixing their strides, but
compiles the branches for the strides recorded at capture; when it re-lays-out an operand (a
transposed patch embedding whose ``.contiguous()`` it elided), the branch reads wrong strides (an
assertion, or with ``size_asserts=False`` silently wrong values). A registered custom op is opaque to
Inductor, so its output keeps the contiguous layout its fake implementation declares.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("adacache_fx::layout_barrier", mutates_args=())
def _layout_barrier_op(x: torch.Tensor) -> torch.Tensor:
    return x.clone(memory_format=torch.contiguous_format)


@_layout_barrier_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def layout_barrier(x: torch.Tensor) -> torch.Tensor:
    """Fix ``x`` to a contiguous layout under ``torch.compile``; the identity otherwise (eager, export)."""
    if torch.compiler.is_dynamo_compiling():
        return torch.ops.adacache_fx.layout_barrier(x)
    return x
