"""``check``: the first thing to run on a new model. Does the transform compute what the model computes?

It captures the model on your inputs with every step computed (the transform is then exact by design),
tells whether capturing left the model's state as it was, and runs the untransformed model and the
transform side by side over a few calls with varied timesteps:

>>> import adacache_fx
>>> from adacache_fx.tools.fixtures import build
>>> model, make_inputs = build("wan")  # a tiny diffusers WanTransformer3DModel
>>> result = adacache_fx.check(model, **make_inputs(0))
>>> result.ok, result.max_diff
(True, 0.0)

A model with an eager-only fast path (``nn.MultiheadAttention`` under ``torch.no_grad()``) differs by
rounding; the report's ``notes`` say why (:mod:`adacache_fx.capture.fastpaths`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn

from .capture import fast_path_note
from .policies import AdaCacheConfig
from .presets import NEVER
from .snapshot import ModelSnapshot

#: Input names taken for the timestep when ``check(timestep=None)``, in this order.
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "vision_timesteps")


@dataclass
class CheckReport:
    """What :func:`check` found. ``ok``: every call equal within ``atol`` and the model's state untouched."""

    model: str
    diffs: list[float]
    timesteps: list[str]
    state_changes: list[str]
    atol: float
    static_inputs: tuple[str, ...] = ()
    traced_scalars: tuple[str, ...] = ()
    blocks: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    varied: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def max_diff(self) -> float:
        return max(self.diffs)

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.atol and not self.state_changes

    def __str__(self) -> str:
        lines = [f"adacache_fx.check({self.model}): {'OK' if self.ok else 'FAILED'}",
                 f"  blocks: {len(self.blocks)} ({self.blocks[0]} .. {self.blocks[-1]}); regions: {self.regions}"
                 if self.blocks else "  blocks: none",
                 f"  inputs read on the host (specialized): {list(self.static_inputs) or 'none'}; "
                 f"int arguments traced: {list(self.traced_scalars) or 'none'}",
                 "  capture left the model's state " + ("untouched" if not self.state_changes else
                                                         "CHANGED: " + "; ".join(self.state_changes)),
                 f"  {'call':>4}  {self.varied or 'inputs':>12}  max |transformed - model|"]
        lines += [f"  {i:>4}  {t:>12}  {d:.3g}" for i, (t, d) in enumerate(zip(self.timesteps, self.diffs), 1)]
        if self.varied is None:
            lines.append("  (no timestep input found: every call used the same inputs; name it with vary=)")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def check(model: nn.Module, *args, num_calls: int = 3, vary: str | None = None, granularity: str = "stack",
          static_inputs=(), atol: float = 0.0, **kwargs) -> CheckReport:
    """Run ``model`` and its transform with every step computed side by side on ``model(*args, **kwargs)``.

    The transform is captured fresh from ``model`` as it is now (``model`` itself is not modified: the
    transform wraps it, and the wrapper is dropped). Over ``num_calls`` calls the timestep input
    (``vary``: its name; default the first of :data:`TIMESTEP_NAMES` among the keyword arguments) is
    scaled from its value towards 0, as a denoising loop does. Returns a :class:`CheckReport`:
    ``diffs`` per call (0.0 expected in float32 where the ops are the same; a rounding step in bf16),
    and ``state_changes``, what capturing changed in the model (expected empty).
    """
    from .api import transform

    if num_calls < 1:
        raise ValueError(f"num_calls must be >= 1, got {num_calls}")
    name = vary if vary is not None else next((n for n in TIMESTEP_NAMES if n in kwargs), None)
    if name is not None and name not in kwargs:
        raise ValueError(f"vary={name!r} is not among the keyword arguments {sorted(kwargs)}")
    calls = [_with_timestep(kwargs, name, 1.0 - i / (num_calls + 1)) for i in range(num_calls)]
    config = AdaCacheConfig(num_steps=max(3, num_calls), codebook=NEVER, granularity=granularity,
                            static_inputs=tuple(static_inputs))
    snapshot = ModelSnapshot.take(model)
    cached = transform(model, config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the capture warns about is in the report's notes
        program, _ = cached.prepare_call(tuple(copy.deepcopy(args)), copy.deepcopy(calls[0]))
    changes = snapshot.changes()
    diffs = []
    with torch.no_grad():
        for call in calls:
            got = cached(*copy.deepcopy(args), **copy.deepcopy(call))
            expected = model(*copy.deepcopy(args), **copy.deepcopy(call))
            diffs.append(_max_diff(got, expected))
    shown = [_describe(call.get(name)) if name is not None else "same" for call in calls]
    notes = [note] if (note := fast_path_note(model)) is not None else []
    return CheckReport(type(model).__name__, diffs, shown, changes, atol, cached.static_inputs,
                       cached.traced_scalars, program.rewrite.blocks, program.rewrite.regions, name, notes)


def _with_timestep(kwargs: dict, name: str | None, factor: float) -> dict:
    call = dict(kwargs)
    if name is None:
        return call
    value = call[name]
    if isinstance(value, torch.Tensor):
        scaled = value.double() * factor
        call[name] = (scaled.round() if not value.is_floating_point() else scaled).to(value.dtype)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        call[name] = type(value)(round(value * factor) if isinstance(value, int) else value * factor)
    return call


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        flat = value.reshape(-1)
        return f"{float(flat[0]):.4g}" + ("..." if flat.numel() > 1 else "")
    return repr(value)


def _max_diff(got, expected) -> float:
    a = [t for t in pytree.tree_leaves(_plain(got)) if isinstance(t, torch.Tensor)]
    b = [t for t in pytree.tree_leaves(_plain(expected)) if isinstance(t, torch.Tensor)]
    if len(a) != len(b):
        raise AssertionError(f"the transform returned {len(a)} tensors, the model {len(b)}")
    return max((float((x.float() - y.float()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b)),
               default=0.0)


def _plain(output):
    """Model outputs as pytrees: diffusers' ``BaseOutput`` as its tuple."""
    to_tuple = getattr(output, "to_tuple", None)
    return to_tuple() if callable(to_tuple) else output
