"""Eager-only fast paths: modules whose eager inference call runs another kernel than any trace records.

``nn.MultiheadAttention`` (``batch_first=True``) and ``nn.TransformerEncoderLayer`` take PyTorch's
native fast path (``torch._native_multi_head_attention``) when called eagerly under ``torch.no_grad()``
in eval mode; tracing, ``torch.export`` included, always records the standard path. The two round
differently (about 1e-7 relative in float32), so a captured graph cannot equal such a model bitwise.
The capture says so once, naming the modules; ``torch.backends.mha.set_fastpath_enabled(False)`` makes
the eager model take the standard path too.
"""

from __future__ import annotations

import torch
from torch import nn


def eager_fast_paths(model: nn.Module) -> list[str]:
    """The submodules of ``model`` whose eager no-grad call may take the native fast path."""
    if not torch.backends.mha.get_fastpath_enabled():
        return []
    found = []
    for name, module in model.named_modules():
        attention = module if isinstance(module, nn.MultiheadAttention) else getattr(module, "self_attn", None)
        if not isinstance(module, (nn.MultiheadAttention, nn.TransformerEncoderLayer)):
            continue
        # the conditions of MultiheadAttention.forward's fast path that the module fixes (the call's: query
        # is key is value, no masks of the wrong kind, are left: a cross-attention call does not take it)
        if (not module.training and isinstance(attention, nn.MultiheadAttention) and attention.batch_first
                and attention._qkv_same_embed_dim and attention.num_heads % 2 == 0 and attention.bias_k is None
                and not attention.add_zero_attn):
            found.append(name or type(module).__name__)
    return found


def fast_path_note(model: nn.Module) -> str | None:
    """One sentence for a warning or a report, or None when no module has an eager fast path."""
    found = eager_fast_paths(model)
    if not found:
        return None
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (f"{type(model).__name__} has modules with an eager-only fast path ({shown}: nn.MultiheadAttention's "
            "self-attention calls under torch.no_grad() run torch._native_multi_head_attention, which no trace "
            "records): the transform computes the standard path, equal to the eager model within rounding "
            "(~1e-7 in float32, a rounding step in bf16), not bitwise; "
            "torch.backends.mha.set_fastpath_enabled(False) makes both take the standard path")
