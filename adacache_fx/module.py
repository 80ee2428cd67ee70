"""CachedModel: the stateful shell around the rewritten graph.

The rewritten graph is a pure function ``(inputs..., state...) -> (outputs..., new_state...)``. This
module captures and rewrites the wrapped model lazily on the first call of each input signature,
holds the state tensors (one set per cache context and signature), feeds them in and writes the new
values back in place. Nothing here reads a tensor value during a generation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import nn

from .capture import CapturedGraph, capture, signature
from .config import AdaCacheConfig, check_num_steps
from .passes import PassError, RewriteResult, StateSpec, rewrite

DEFAULT_CONTEXT = "default"


class TransformError(RuntimeError):
    """The model's structure does not allow caching (no block stack, a block that cannot be skipped...)."""


@dataclass
class Program:
    """A captured and rewritten call signature."""

    captured: CapturedGraph
    rewrite: RewriteResult

    @property
    def graph_module(self):
        return self.rewrite.graph_module

    @property
    def specs(self) -> list[StateSpec]:
        return self.rewrite.state_specs


def _mark_static(args, kwargs) -> None:
    """The captured graphs are specialized to their shapes: keep Dynamo from making sizes symbolic
    (its automatic dynamic shapes on a second signature), which would recompile a static graph as
    a dynamic one. A new signature gets its own capture and its own compilation instead."""
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            torch._dynamo.mark_static(leaf)


class CachedModel(nn.Module):
    """A model whose block stack is skipped on the steps AdaCache decides to reuse.

    Behaves like the wrapped model: same call signature and outputs, ``config``, ``dtype``,
    ``device`` and the wrapped model's ``state_dict``. Use :meth:`cache_context` for separate
    conditional / unconditional state, and :func:`adacache_fx.reset` to start a new generation.
    Inference only: the outputs carry no autograd graph.

    State layout: each (cache context, input signature) owns its state tensors (*storage*). For each
    signature, one stable set of *bound* tensors is what the graph reads and writes; entering a cache
    context re-points the bound tensors at that context's storage (``Tensor.set_``, no copy), so a
    compiled graph sees the same tensors whatever the context and never recompiles for it.
    """

    # ``torch.compile(module)`` runs ``_infer_parameters`` eagerly before every compiled call of a
    # module that has ``_initialize_hook`` (its support for lazy modules). This module is lazy in the
    # same way: it captures the model, and binds the state, outside the compiled region.
    _initialize_hook = None

    def __init__(self, model: nn.Module, config: AdaCacheConfig):
        super().__init__()
        self.model = model
        self.adacache_config = config
        self._num_steps = config.num_steps
        self._programs: dict[tuple, Program] = {}
        self._storage: dict[str, dict[tuple, dict[str, torch.Tensor]]] = {}
        self._bound: dict[tuple, dict[str, torch.Tensor]] = {}
        self._last_key: dict[str, tuple] = {}
        self._context = DEFAULT_CONTEXT
        self._current: tuple[Program, dict[str, torch.Tensor]] | None = None
        self._program_hooks: list = []  # called on each new Program (e.g. to compile its branches)
        self._scheduler = None  # set by adacache_fx.enable: generations follow the pipeline's scheduler

    # -- behave like the wrapped model ------------------------------------------------------------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None:
                raise
            return getattr(model, name)

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.model.load_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # .to()/.half() may replace buffers: captured graphs would keep the old ones.
        self._programs.clear()
        self._storage.clear()
        self._bound.clear()
        self._last_key.clear()
        self._current = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"adacache={self.adacache_config}"

    # -- cache contexts and generations -----------------------------------------------------------
    @contextlib.contextmanager
    def cache_context(self, name: str, **loop_info):
        """Use a separate cache state inside the block (e.g. ``"cond"`` and ``"uncond"`` of CFG).

        Accepts the keyword arguments diffusers pipelines pass (``step_index``,
        ``num_inference_steps``, ...): ``num_inference_steps`` sets N, and ``step_index=0`` starts a
        new generation in this context.
        """
        previous = self._context
        self._switch(name)
        steps = loop_info.get("num_inference_steps")
        if loop_info.get("step_index") == 0 and steps is not None:
            self._begin_generation(int(steps))
        try:
            yield
        finally:
            self._switch(previous)

    def _switch(self, name: str) -> None:
        self._context = name
        for key, bound in self._bound.items():
            self._bind(key, bound)

    def _begin_generation(self, num_steps: int) -> None:
        """A new generation starts in the active context (all contexts if N changes)."""
        if num_steps != self._num_steps:
            self.reset(num_steps)
            return
        for state in self._storage.get(self._context, {}).values():
            state["step"].zero_()
            state["history"].fill_(float("nan"))

    def _follow_scheduler(self) -> None:
        """With :func:`adacache_fx.enable`: a scheduler that has not stepped yet means a new generation."""
        scheduler = self._scheduler
        if scheduler is not None and getattr(scheduler, "step_index", None) in (None, 0):
            timesteps = getattr(scheduler, "timesteps", None)
            if timesteps is not None and len(timesteps) >= 3:
                self._begin_generation(len(timesteps))

    @property
    def num_steps(self) -> int | None:
        return self._num_steps

    def reset(self, num_steps: int | None = None) -> None:
        """Start a new generation in every context; optionally change the number of steps N."""
        if num_steps is not None:
            check_num_steps(num_steps)
            if num_steps != self._num_steps:
                self._num_steps = num_steps
                self._storage.clear()
                self._last_key.clear()
                for key, bound in self._bound.items():
                    self._bind(key, bound)
                return
        for states in self._storage.values():
            for state in states.values():
                state["step"].zero_()
                state["history"].fill_(float("nan"))

    # -- preparing a call (always eager) ----------------------------------------------------------
    def _key(self, args, kwargs) -> tuple:
        param = next(self.model.parameters(), None)
        where = (param.dtype, str(param.device)) if param is not None else None
        return (signature(args, kwargs), where)

    def _capture(self, key, args, kwargs) -> Program:
        captured = capture(self.model, args, kwargs, functional=self.adacache_config.granularity == "branch")
        try:
            result = rewrite(captured.graph_module, self.adacache_config)
        except PassError as error:
            raise TransformError(f"adacache_fx cannot cache {type(self.model).__name__}: {error}") from error
        program = Program(captured, result)
        for hook in self._program_hooks:
            hook(program)
        self._programs[key] = program
        return program

    def _storage_for(self, key, context: str) -> dict[str, torch.Tensor]:
        states = self._storage.setdefault(context, {})
        state = states.get(key)
        if state is None:
            if self._num_steps is None:
                raise ValueError(
                    "adacache_fx does not know the number of denoising steps N: set "
                    "AdaCacheConfig(num_steps=N), call adacache_fx.reset(model, num_steps=N) before the "
                    "generation, or use adacache_fx.enable(pipe) with a diffusers pipeline"
                )
            program, device = self._programs[key], key[1][1] if key[1] else "cpu"  # the weights' device
            state = {}
            for spec in program.specs:
                shape = (self._num_steps, 4) if spec.shape is None else spec.shape
                state[spec.name] = torch.full(shape, spec.fill, dtype=spec.dtype, device=device)
            state["num_steps"].fill_(self._num_steps)
            states[key] = state
        return state

    def _bind(self, key, bound: dict[str, torch.Tensor]) -> None:
        storage = self._storage_for(key, self._context)
        with torch.no_grad():
            for name, tensor in storage.items():
                bound[name].set_(tensor)

    def _check_generation(self, key) -> None:
        """Refuse a new input signature in the middle of a generation (reads the step: eager only)."""
        last = self._last_key.get(self._context)
        if last is not None and last != key:
            old = self._storage.get(self._context, {}).get(last)
            if old is not None and 0 < int(old["step"]) < int(old["num_steps"]):
                raise ValueError(
                    f"the input signature changed in the middle of a generation (step {int(old['step'])} "
                    f"of {int(old['num_steps'])} in cache context {self._context!r}); call "
                    "adacache_fx.reset(model) first. The cached state was left untouched."
                )
        self._last_key[self._context] = key

    def _prepare_call(self, args, kwargs) -> tuple[Program, dict[str, torch.Tensor]]:
        self._follow_scheduler()
        key = self._key(args, kwargs)
        program = self._programs.get(key)
        if program is None:
            program = self._capture(key, args, kwargs)
        self._check_generation(key)
        bound = self._bound.get(key)
        if bound is None:
            storage = self._storage_for(key, self._context)
            bound = {name: torch.empty(0, dtype=t.dtype, device=t.device) for name, t in storage.items()}
            self._bind(key, bound)
            self._bound[key] = bound
        self._current = (program, bound)
        return self._current

    def _infer_parameters(self, module, args, kwargs=None):
        """Called eagerly by ``torch.compile(module)`` before each compiled call (see ``_initialize_hook``)."""
        self._prepare_call(tuple(args), dict(kwargs or {}))
        _mark_static(args, kwargs)

    def compile(self, *args, **kwargs):
        """Like ``nn.Module.compile``, with the eager preparation of each call kept outside the graph."""
        compiled = torch.compile(self._call_impl, *args, **kwargs)

        def call(*call_args, **call_kwargs):
            self._prepare_call(call_args, call_kwargs)
            _mark_static(call_args, call_kwargs)
            return compiled(*call_args, **call_kwargs)

        self._compiled_call_impl = call

    # -- the call ---------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            if self._current is None:
                raise TransformError(
                    "adacache_fx prepares each call eagerly: compile the transformed module itself "
                    "(torch.compile(model) or model.compile()), not a function that calls it"
                )
            program, state = self._current
        else:
            program, state = self._prepare_call(args, kwargs)
        flat = program.captured.flatten_inputs(args, kwargs)
        with torch.no_grad():  # an inference transform: reusing residuals has no meaningful gradient
            outputs = program.graph_module(*flat, *state.values())
        returned = [state[spec.name] for spec in program.specs if spec.returned]
        n_user = len(outputs) - len(returned)
        for tensor, new in zip(returned, outputs[n_user:]):
            tensor.copy_(new)
        return program.captured.unflatten_outputs(outputs[:n_user])

    # -- introspection ----------------------------------------------------------------------------
    def current_state(self, context: str | None = None) -> dict[str, torch.Tensor] | None:
        """The state of the last signature used in ``context`` (default: the active context)."""
        context = self._context if context is None else context
        key = self._last_key.get(context)
        if key is None:
            return None
        return self._storage.get(context, {}).get(key)

    def program(self, context: str | None = None) -> Program | None:
        key = self._last_key.get(self._context if context is None else context)
        return None if key is None else self._programs.get(key)
