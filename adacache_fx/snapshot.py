"""What a model holds besides its weights, taken before a trace and put back after it.

A trace runs the model's Python code: a lazily filled rotary cache sets ``self.cached_freqs_seq_len``, a
module counts its calls in ``self.fwd_id``, an ``functools.lru_cache`` keeps a positional embedding
computed from fake tensors. A second trace (or the user's next eager call) would then see a model that no
longer computes what the user's model computes. :class:`ModelSnapshot` records, for every submodule,

* its attributes (``__dict__``: identity of each value, and the contents of plain containers and plain
  objects held there, a few levels down),
* its parameters, buffers and children (identity), and the buffers' values,
* the ``functools.lru_cache`` functions of the Python modules that define its classes (their miss counts),
* the plain containers among those Python modules' globals,

and :meth:`ModelSnapshot.restore` puts all of it back: attributes set, added or deleted, containers
mutated in place, buffers written or replaced, caches filled. Parameters written in place cannot be put
back (they are not copied) and are reported by :meth:`ModelSnapshot.changes`.
"""

from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass, field

import torch
from torch import nn

#: Buffers are copied to restore their values after a trace, up to this many bytes in all; beyond it,
#: buffers are compared by version counter only and a written one is reported, not restored.
MAX_BUFFER_COPY_BYTES = 1 << 30
_DEPTH = 3  # how far into nested containers and plain objects the snapshot goes
_ATOMIC = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size)
_OPAQUE = (nn.Module, torch.Tensor, type, types.ModuleType, types.FunctionType, types.MethodType,
           types.BuiltinFunctionType, functools.partial)


@dataclass
class _Contents:
    """The items of one mutable container or plain object (its ``__dict__``) at snapshot time."""

    target: object
    items: object  # dict / list / set copy


@dataclass
class ModelSnapshot:
    """The state of a model apart from its parameters' values; see the module docstring."""

    model: nn.Module
    attributes: dict[int, tuple[nn.Module, dict]] = field(default_factory=dict)
    contents: dict[int, _Contents] = field(default_factory=dict)
    buffers: dict[int, tuple[str, torch.Tensor, int, torch.Tensor | None]] = field(default_factory=dict)
    parameters: dict[int, tuple[str, torch.Tensor, int]] = field(default_factory=dict)
    caches: dict[int, tuple[str, object, int]] = field(default_factory=dict)

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        snap = cls(model)
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
        copy_buffers = buffer_bytes <= MAX_BUFFER_COPY_BYTES
        for name, module in model.named_modules(remove_duplicate=True):
            attributes = dict(module.__dict__)
            snap.attributes[id(module)] = (module, attributes)
            for value in attributes.values():
                snap._record(value, _DEPTH)
            prefix = f"{name}." if name else ""
            for key, buffer in module._buffers.items():
                if buffer is not None and id(buffer) not in snap.buffers and not _fake(buffer):
                    saved = buffer.detach().clone() if copy_buffers else None
                    snap.buffers[id(buffer)] = (prefix + key, buffer, buffer._version, saved)
            for key, param in module._parameters.items():
                if param is not None and not _fake(param):
                    snap.parameters.setdefault(id(param), (prefix + key, param, param._version))
        for python_module in _defining_modules(model):
            for value in list(vars(python_module).values()):
                if isinstance(value, (dict, list, set)):
                    snap._record(value, 1)
            for cache_name, cache in _lru_caches(python_module):
                snap.caches.setdefault(id(cache), (cache_name, cache, cache.cache_info().misses))
        return snap

    def _record(self, value, depth: int) -> None:
        if depth <= 0 or id(value) in self.contents or isinstance(value, _ATOMIC + _OPAQUE):
            return
        if isinstance(value, (dict, list, set)):
            items = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else set(value)
            self.contents[id(value)] = _Contents(value, items)
            for item in value.values() if isinstance(value, dict) else value:
                self._record(item, depth - 1)
        elif _plain_object(value):
            self.contents[id(value)] = _Contents(value, dict(vars(value)))
            for item in vars(value).values():
                self._record(item, depth - 1)

    def written_buffers(self) -> list[torch.Tensor]:
        """The buffers written in place since the snapshot."""
        return [buffer for _, buffer, version, _ in self.buffers.values() if buffer._version != version]

    def changes(self) -> list[str]:
        """What differs from the snapshot, in words (empty: the model is as it was)."""
        found = []
        for module, attributes in self.attributes.values():
            label = _label(self.model, module)
            now = module.__dict__
            for key in attributes.keys() | now.keys():
                if key not in now:
                    found.append(f"{label}.{key} deleted")
                elif key not in attributes:
                    found.append(f"{label}.{key} added")
                elif now[key] is not attributes[key]:
                    found.append(f"{label}.{key} set")
        for contents in self.contents.values():
            if not _same_items(contents):
                found.append(f"contents of a {type(contents.target).__name__} changed")
        for name, buffer, version, _ in self.buffers.values():
            if buffer._version != version:
                found.append(f"buffer {name} written")
        for name, param, version in self.parameters.values():
            if param._version != version:
                found.append(f"parameter {name} written")
        for name, cache, misses in self.caches.values():
            if cache.cache_info().misses > misses:  # an entry computed since (a cleared cache only recomputes)
                found.append(f"lru_cache {name} filled")
        return found

    def restore(self) -> list[str]:
        """Put the snapshot back; returns what could not be put back (parameters written in place,
        buffers too large to have been copied)."""
        left = []
        for contents in self.contents.values():
            if not _same_items(contents):
                target, items = contents.target, contents.items
                if isinstance(target, (dict, list, set)):
                    target.clear()
                    target.update(items) if not isinstance(target, list) else target.extend(items)
                else:
                    vars(target).clear()
                    vars(target).update(items)
        for module, attributes in self.attributes.values():
            now = module.__dict__
            for key in [k for k in now if k not in attributes]:
                del now[key]
            for key, value in attributes.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value
        with torch.no_grad():
            for name, buffer, version, saved in self.buffers.values():
                if buffer._version != version:
                    if saved is None:
                        left.append(f"buffer {name} written (too large to have been copied)")
                    else:
                        buffer.copy_(saved)
                        self.buffers[id(buffer)] = (name, buffer, buffer._version, saved)
        for name, param, version in self.parameters.values():
            if param._version != version:
                left.append(f"parameter {name} written")
        for name, cache, misses in self.caches.values():
            if cache.cache_info().misses > misses:
                cache.cache_clear()  # entries cannot be removed one by one; a cache recomputes them
                self.caches[id(cache)] = (name, cache, 0)  # clearing also resets the miss count
        return left


_MISSING = object()


def _container(value) -> bool:
    return isinstance(value, (dict, list, set)) or _plain_object(value)


def _plain_object(value) -> bool:
    """An instance of a Python class holding plain attributes (a cache object, a config), not a module,
    tensor, function or class."""
    return (not isinstance(value, _ATOMIC + _OPAQUE) and hasattr(value, "__dict__")
            and type(value).__module__ not in ("builtins", "torch", "typing")
            and not type(value).__module__.startswith(("torch.", "logging", "threading", "enum")))


def _same_items(contents: _Contents) -> bool:
    target, items = contents.target, contents.items
    now = dict(vars(target)) if not isinstance(target, (dict, list, set)) else target
    if isinstance(target, set):
        return now == items
    if len(now) != len(items):
        return False
    if isinstance(target, list):
        return all(a is b for a, b in zip(now, items))
    return all(key in items and now[key] is items[key] for key in now)


def _fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def _defining_modules(model: nn.Module) -> list[types.ModuleType]:
    """The Python modules that define the classes of the model's submodules (their MROs), the package
    roots torch and builtins excluded."""
    names = {}
    for module in model.modules():
        for cls in type(module).__mro__:
            name = cls.__module__
            if name and not name.startswith(("torch.", "builtins")) and name != "torch":
                names.setdefault(name, None)
    return [sys.modules[n] for n in names if n in sys.modules]


def _lru_caches(python_module: types.ModuleType):
    """``functools.lru_cache`` functions among a Python module's globals and its classes' attributes."""
    def caches(namespace: dict, prefix: str):
        for key, value in list(namespace.items()):
            target = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if isinstance(target, functools._lru_cache_wrapper):
                yield prefix + key, target

    yield from caches(vars(python_module), f"{python_module.__name__}.")
    for value in list(vars(python_module).values()):
        if isinstance(value, type) and value.__module__ == python_module.__name__:
            yield from caches(vars(value), f"{python_module.__name__}.{value.__name__}.")


def _label(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return f"{type(model).__name__}{'.' + name if name else ''}"
    return type(module).__name__
