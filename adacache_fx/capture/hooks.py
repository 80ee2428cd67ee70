"""diffusers model hooks that change a module's state around its forward, made traceable for the capture.

``enable_layerwise_casting`` stores weights in a low-precision dtype and casts them for each forward in
pre/post-forward hooks (``module.to(compute_dtype)``, then back to the storage dtype): ``torch.export``
cannot swap parameters that way (``_apply(): Couldn't swap Linear.weight``). During the capture each such
hook casts functionally instead: the module's floating parameters and buffers are replaced, for the
duration of its forward, by their casts to the compute dtype, so the graph reads the stored weights and
casts them itself, as the hook does eagerly (the same values).

``enable_model_cpu_offload`` puts accelerate's ``CpuOffload`` hook on the whole model: it moves the model
to the execution device (``module.to``: the same parameter objects, which the captured program holds)
before its forward. The capture traces the forward without it, and :class:`~adacache_fx.CachedModel`
runs the hook's ``pre_forward`` eagerly before each call (:func:`run_offload_hook`). Hooks that move
weights between devices inside the model (group offloading, ``enable_sequential_cpu_offload``) have no
traceable equivalent: the capture names them.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from .errors import CaptureError

#: diffusers hooks that move modules between devices in their pre/post-forward (no traceable equivalent)
_DEVICE_HOOKS = ("GroupOffloadingHook", "LazyPrefetchGroupOffloadingHook")


def _diffusers_hooks(model: torch.nn.Module):
    """``(module name, hook, its function references)`` for every hook of diffusers' hook registries in
    ``model`` (a registry calls ``fn_ref.pre_forward`` / ``post_forward``, bound to the hook when registered)."""
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            refs = [ref for ref in getattr(registry, "_fn_refs", ())
                    if getattr(getattr(ref, "pre_forward", None), "__self__", None) is hook]
            yield name, hook, refs


def _functional_cast(hook):
    """Pre/post-forward functions that give the module its parameters cast to ``hook.compute_dtype`` for
    the forward, without touching the stored ones."""
    saved: list[list] = []

    def pre_forward(module, *args, **kwargs):
        swapped = []
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for key, tensor in table.items():
                    if tensor is not None and tensor.is_floating_point():
                        swapped.append((table, key, tensor))
                        table[key] = tensor.to(hook.compute_dtype)
        saved.append(swapped)
        return args, kwargs

    def post_forward(module, output):
        for table, key, tensor in saved.pop():
            table[key] = tensor
        return output

    return pre_forward, post_forward


def _accelerate_hook(module) -> str | None:
    hook = getattr(module, "_hf_hook", None)
    return None if hook is None else type(hook).__name__


def run_offload_hook(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Run the ``pre_forward`` of accelerate's model-level ``CpuOffload`` hook, if ``model`` has one (it
    offloads the previous model of the pipeline and moves this one to the execution device). Eager only;
    the inputs are not moved (the pipeline puts them on the execution device)."""
    hook = getattr(model, "_hf_hook", None)
    if hook is not None and type(hook).__name__ == "CpuOffload":
        hook.pre_forward(model, *args, **kwargs)


@contextlib.contextmanager
def traceable_hooks(model: torch.nn.Module):
    """Within the block, diffusers' layerwise-casting hooks of ``model`` cast functionally and a model-level
    ``CpuOffload`` hook is left out of the trace (see the module docstring); a hook that moves weights
    inside the model is a :class:`CaptureError` naming it and what to do."""
    if "diffusers" not in sys.modules and "accelerate" not in sys.modules:
        yield
        return
    name = type(model).__name__
    for path, module in model.named_modules():
        kind = _accelerate_hook(module)
        if kind is not None and not (path == "" and kind == "CpuOffload"):
            raise CaptureError(
                f"adacache_fx cannot capture {name}: {path or 'the model'} has accelerate's {kind} (from "
                "pipe.enable_sequential_cpu_offload() or accelerate's dispatch), which moves weights between "
                "devices around each layer's forward; a captured program holds its weights where they were. What "
                "you can do: use pipe.enable_model_cpu_offload() instead (supported: it moves the whole transformer "
                "before its call), or keep the transformer on the device (pipe.remove_all_hooks(); pipe.to(device))"
            )
    root_offload = _accelerate_hook(model) == "CpuOffload" and "_old_forward" in vars(model)
    patched = []
    if root_offload:  # trace the forward under the hook's wrapper
        wrapper = vars(model)["forward"]
        model.forward = vars(model)["_old_forward"]
    try:
        for path, hook, refs in _diffusers_hooks(model):
            kind = type(hook).__name__
            if kind in _DEVICE_HOOKS:
                raise CaptureError(
                    f"adacache_fx cannot capture {name}: {path or 'the model'} has diffusers' {kind} (from "
                    "enable_group_offload / apply_group_offloading), which moves weights between devices around "
                    "each forward; a captured program holds its weights where they were. What you can do: transform "
                    "the model without group offloading (keep it on the device), or use enable_layerwise_casting to "
                    "save memory instead (supported)"
                )
            if kind == "LayerwiseCastingHook":
                for ref in refs:
                    patched.append((ref, ref.pre_forward, ref.post_forward))
                    ref.pre_forward, ref.post_forward = _functional_cast(hook)
        yield
    finally:
        for ref, pre, post in patched:
            ref.pre_forward, ref.post_forward = pre, post
        if root_offload:
            model.forward = wrapper
