"""Held memory: the tensor bytes reachable from a pipeline, sampled around every transformer call."""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

_LEAVES = (str, bytes, int, float, bool, complex, type(None), type, types.ModuleType, types.FunctionType,
           types.BuiltinFunctionType, types.MethodType, torch.dtype, torch.device)


def held_storages(root, max_objects: int = 200_000) -> dict[int, int]:
    """``{storage pointer: bytes}`` of the tensors reachable from ``root`` through containers and object
    attributes, skipping module parameters and buffers and fx graphs (their metadata holds fake tensors)."""
    seen, found, stack = set(), {}, [root]
    while stack and len(seen) < max_objects:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if not isinstance(obj, nn.Parameter):
                with contextlib.suppress(Exception):
                    storage = obj.untyped_storage()
                    found[storage.data_ptr()] = storage.nbytes()
            continue
        if isinstance(obj, (torch.fx.Graph, torch.fx.Node)):
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, nn.Module):
            stack.extend(v for k, v in vars(obj).items() if k not in ("_parameters", "_buffers"))
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    found.pop(0, None)
    return found


@contextlib.contextmanager
def sample_held(bench, out: list[int]):
    """Sample :meth:`Bench.held_bytes` before and after every call of the pipeline's transformer."""
    model = bench.pipe.transformer
    sample = lambda *_a, **_k: out.append(bench.held_bytes())  # noqa: E731
    handles = [model.register_forward_pre_hook(sample), model.register_forward_hook(sample)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
