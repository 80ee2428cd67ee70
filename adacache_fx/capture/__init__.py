"""Capture: turn a model call into a flat fx graph with ``torch.export`` (non-strict), exactly.

``torch.fx.symbolic_trace`` fails on diffusers transformers; non-strict ``torch.export`` captures them
with ``nn_module_stack`` metadata on every node, which the passes use to find the block stack.

The captured graph computes what the model computes on this call and every later one, and capturing
leaves the model as it was (:mod:`adacache_fx.snapshot`): every attempt starts from the user's state
and puts it back, and a buffer the forward writes is a data edge of the graph. What ``torch.export``
cannot trace is evaluated eagerly instead, on real values (:mod:`.static`):

* *static inputs*: input tensors whose values the model reads on the host (``.item()``, ``.tolist()``,
  ``int(t)``, ``if t > 0``, a boolean mask that selects tokens) to size or choose something. Their
  values become constants of the capture and part of its :func:`signature`, like a shape. They are
  named by ``AdaCacheConfig(static_inputs=...)``, or found: when the export fails on a data-dependent
  guard or its graph reads a tensor on the host, the inputs of at most
  :data:`~.export.SPECIALIZE_MAX_NUMEL` elements are specialized and those the model reads on the
  host are kept (logged at debug level on ``adacache_fx.capture``).
* *input-independent tensors*, when the trace leaves a tensor it computed outside the graph (a
  buffer rebuilt through ``.data`` for a new input size, as diffusers' CogVideoX positional
  embedding does): the export is retried with every tensor made without inputs (``arange``,
  ``zeros``...) and everything computed from such tensors alone evaluated eagerly.

Python int arguments are symbolic inputs of the graph (a timestep passed as an int), unless the
forward sizes a tensor or branches on them: then they are constants of the signature.

Modules with an eager-only fast path (``nn.MultiheadAttention`` under ``torch.no_grad()``) cannot be
captured bitwise: :mod:`.fastpaths` names them, and the transform warns once.
"""

from .errors import CaptureError, data_dependent_errors, is_data_dependent
from .export import SPECIALIZE_MAX_NUMEL, capture
from .fastpaths import eager_fast_paths, fast_path_note
from .graph import CapturedGraph, named_leaves, signature

__all__ = [
    "SPECIALIZE_MAX_NUMEL",
    "CaptureError",
    "CapturedGraph",
    "capture",
    "data_dependent_errors",
    "eager_fast_paths",
    "fast_path_note",
    "is_data_dependent",
    "named_leaves",
    "signature",
]
