"""What a capture bakes in of a model's Python-visible state, and how to tell that it changed.

A captured program runs the adapters the peft tuner layers had at capture (which are active, their
scalings, whether they are merged or disabled, which adapter sub-modules exist) and holds the parameter
tensors the model had, in their dtypes (a weight replaced since, e.g. by ``torchao.quantization.quantize_``,
or cast by ``enable_layerwise_casting``, is not seen).
Both are read here on the host (no tensor value is read): :class:`~adacache_fx.CachedModel` compares them
before each call (:class:`ModelWatch` over :func:`fingerprint`: one walk over the modules, identities and plain values only) and
captures again when they changed; the readable forms (:func:`adapter_fingerprint`, :func:`weight_types`)
are built only when something changed, to say what. peft is imported only when the process already
imported it.
"""

from __future__ import annotations

import sys

from torch import nn

Fingerprint = tuple  # ((module name, layer state), ...): () without peft layers


def _plain(value):
    """A hashable stand-in for one attribute value: scalars as they are, containers by content, modules
    by type (``Dropout`` vs ``Identity``), anything else by type name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, nn.Module) and not hasattr(value, "keys"):
        return type(value).__name__
    if hasattr(value, "keys"):  # dict, ModuleDict, ParameterDict
        return tuple(sorted((str(k), _plain(value[k])) for k in value.keys()))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        return tuple(sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items)
    return type(value).__name__


def _layer_state(layer) -> tuple:
    fields = {
        "active adapters": list(layer.active_adapters),
        "merged adapters": list(getattr(layer, "merged_adapters", ())),
        "disabled": bool(getattr(layer, "disable_adapters", False)),
    }
    for name in (*getattr(layer, "adapter_layer_names", ()), *getattr(layer, "other_param_names", ())):
        fields[name] = getattr(layer, name, None)
    for name, value in vars(layer).items():  # the layer's own flags (use_dora, cast_input_dtype_enabled...)
        if not name.startswith("_") and name != "training" and isinstance(value, (bool, int, float, str)):
            fields.setdefault(name, value)
    return tuple((name, _plain(value)) for name, value in fields.items())


def _tuner_layer_class():
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    return BaseTunerLayer


def _layer_key(layer) -> tuple:
    """The cheap form of :func:`_layer_state`: the same fields, containers by their items (modules by identity),
    read from the instance dicts (peft's ``_active_adapter`` / ``_disable_adapters`` behind its properties)."""
    attrs, modules = vars(layer), layer._modules
    active = attrs["_active_adapter"] if "_active_adapter" in attrs else layer.active_adapters
    disabled = attrs["_disable_adapters"] if "_disable_adapters" in attrs else getattr(layer, "disable_adapters", False)
    key = [tuple(active) if isinstance(active, list) else active, tuple(attrs.get("merged_adapters", ())), disabled]
    for name in (*getattr(layer, "adapter_layer_names", ()), *getattr(layer, "other_param_names", ())):
        value = modules[name] if name in modules else attrs.get(name)
        key.append(tuple(value.items()) if hasattr(value, "items") else value)
    return tuple(key)


def fingerprint(model: nn.Module) -> tuple:
    """What the captured programs depend on besides the inputs, compared before each call: every peft tuner
    layer's state and every parameter's identity and dtype (one walk; a move to another device is no change)."""
    tuner = _tuner_layer_class()
    layers, weights = [], []
    stack, seen = [model], set()
    while stack:  # the modules depth first, without named_modules' generators and prefixes
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        skip = ()
        if tuner is not None and isinstance(module, tuner):
            layers.append(_layer_key(module))  # its adapter containers by identity: not walked
            skip = (*getattr(module, "adapter_layer_names", ()), *getattr(module, "other_param_names", ()))
        for p in module._parameters.values():
            if p is not None:
                weights.append((id(p), p.dtype))
        stack.extend(m for name, m in module._modules.items() if m is not None and name not in skip)
    return tuple(layers), tuple(weights)


def adapter_fingerprint(model: nn.Module) -> Fingerprint:
    """The state of every peft tuner layer of ``model`` that a trace bakes in, by module name and in plain
    values (``()`` without any): what a change message is made from."""
    tuner = _tuner_layer_class()
    if tuner is None:
        return ()
    return tuple((name, _layer_state(module)) for name, module in model.named_modules() if isinstance(module, tuner))


def _difference(name: str, before, after) -> str:
    if isinstance(before, tuple) and isinstance(after, tuple) and all(
            isinstance(v, tuple) and len(v) == 2 for v in (*before, *after)):  # per adapter: name the changed ones
        old, new = dict(before), dict(after)
        parts = [f"{k} added" for k in new if k not in old] + [f"{k} removed" for k in old if k not in new]
        parts += [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if k in old and old[k] != new[k]]
        return f"{name}: {', '.join(parts)}"
    return f"{name} {before!r} -> {after!r}"


def weight_types(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the type of its data (``Tensor``, a torchao subclass...), to describe a change."""
    return {name: f"{type(getattr(p, 'data', p)).__name__}({str(p.dtype).removeprefix('torch.')})"
            for name, p in model.named_parameters()}


def describe_weights(old: dict[str, str], new: dict[str, str]) -> str:
    """Which parameters were replaced, in a few words."""
    changed = [n for n in new if old.get(n) != new[n]]
    if not changed:
        return f"{len(new)} parameters replaced by others of the same type" if old.keys() == new.keys() else (
            f"{len(set(new) ^ set(old))} parameters added or removed")
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    return f"weights changed: {changed[0]} {old.get(changed[0])} -> {new[changed[0]]}{more}"


def describe_change(old: Fingerprint, new: Fingerprint) -> str:
    """What changed between two fingerprints, in a few words (on the first layer that differs)."""
    old_layers, new_layers = dict(old), dict(new)
    if set(old_layers) != set(new_layers):
        added, removed = len(set(new_layers) - set(old_layers)), len(set(old_layers) - set(new_layers))
        return ", ".join(f"{n} tuner layers {what}" for n, what in ((added, "added"), (removed, "removed")) if n)
    changed = [name for name in new_layers if new_layers[name] != old_layers[name]]
    before, after = dict(old_layers[changed[0]]), dict(new_layers[changed[0]])
    keys = [k for k in after if after[k] != before.get(k)]
    if "lora_A" in keys:  # adapters added or removed: name them once, not in every per-adapter field
        keys = [k for k in keys if k in ("active adapters", "merged adapters", "disabled", "lora_A")]
    fields = [_difference("adapters" if k == "lora_A" else k, before.get(k), after[k]) for k in keys]
    more = f" (and {len(changed) - 1} more layers)" if len(changed) > 1 else ""
    return f"{changed[0]}: {'; '.join(fields)}{more}"


class ModelWatch:
    """What a model's captured programs were captured with (:func:`fingerprint`), and what changed since.

    :meth:`changed` compares the model now with the last look: None when nothing a capture bakes in
    changed, else ``(what, why)``: ``"peft adapters"`` or ``"weights"``, and the readable difference.
    """

    def __init__(self, model: nn.Module):
        self._fingerprint = fingerprint(model)
        self._described = adapter_fingerprint(model), weight_types(model)

    def changed(self, model: nn.Module) -> tuple[str, str] | None:
        current = fingerprint(model)
        if current == self._fingerprint:
            return None
        described = adapter_fingerprint(model), weight_types(model)
        if current[0] != self._fingerprint[0]:
            change = "peft adapters", describe_change(self._described[0], described[0])
        else:
            change = "weights", describe_weights(self._described[1], described[1])
        self._fingerprint, self._described = current, described
        return change
