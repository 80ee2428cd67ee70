"""CachedModel: the stateful shell around the rewritten graph.

The rewritten graph is a pure function ``(inputs..., state...) -> (outputs..., new_state...)``. This
module captures and rewrites the wrapped model lazily on the first call of each input signature,
feeds it the state of the active cache context (held by a :class:`~adacache_fx.state.StateStore`)
and writes the new values back in place. Nothing here reads a tensor value during a generation,
except the few values of the static inputs (small tensors the model reads on the host), which are
part of the signature key.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .adapters import ModelWatch
from .capture import fast_path_note, signature
from .capture.dynamic import DynamicShapes, SizedKey, input_sizes, mark_shapes
from .capture.hooks import run_offload_hook
from .config import CacheConfig
from .eager import plain_eager
from .parallel import check_same_call, context_parallel_group
from .passes import PassError, rewrite
from .program import Program, SignatureKey
from .report import Report, read_report
from .state import StateStore
from .steps import StepCountCheck, always_computed, user_stacklevel

logger = logging.getLogger("adacache_fx")


class TransformError(RuntimeError):
    """The model's structure does not allow caching (no block stack, a block that cannot be skipped...)."""


class CachedModel(nn.Module):
    """A model whose block stack is skipped on the steps the caching policy decides to reuse.

    Behaves like the wrapped model: same call signature and outputs, ``config``, ``dtype``,
    ``device`` and the wrapped model's ``state_dict``. Use :meth:`cache_context` for separate
    conditional / unconditional state, and :meth:`reset` to start a new generation.
    Inference only: the outputs carry no autograd graph.

    The public methods below are what integrations build on: :meth:`prepare_call` (capture and bind
    a call, eagerly), :meth:`register_prepare_hook` (run code before each call is prepared, e.g. to
    follow a pipeline's generations), :meth:`register_program_hook` (post-process each captured
    program, e.g. compile its branches), :attr:`programs`, :attr:`contexts`, :meth:`state` and
    :meth:`report`.
    """

    # ``torch.compile(module)`` runs ``_infer_parameters`` eagerly before every compiled call of a
    # module that has ``_initialize_hook`` (its support for lazy modules). This module is lazy in the
    # same way: it captures the model, and binds the state, outside the compiled region.
    _initialize_hook = None

    #: Whether ``cache_context(..., step_index=0, num_inference_steps=N)`` starts a generation with that N
    #: (``enable(pipe)`` turns it off for experts that get only a share of the pipeline's steps).
    loop_info_sets_steps = True

    def __init__(self, model: nn.Module, config: CacheConfig, dynamic_shapes: dict | str | None = None):
        super().__init__()
        per_sample = getattr(config, "batch_decisions", "shared") == "per_sample"  # a static batch ("auto")
        self._dynamic = DynamicShapes(dynamic_shapes, batch=not per_sample)  # the sizes the programs keep symbolic
        self._sized: dict[tuple, SizedKey] = {}  # (signature key, input shapes) -> state key (dynamic shapes)
        self.model = model
        self.adacache_config = config
        self._store = StateStore(config.num_steps)
        self._programs: dict[SignatureKey, Program] = {}
        self._current: tuple[Program, dict[str, torch.Tensor]] | None = None
        self._program_hooks: OrderedDict[int, Callable[[Program], None]] = OrderedDict()  # as torch's hook dicts
        self._prepare_hooks: OrderedDict[int, Callable] = OrderedDict()
        # What the captures found out, so later signatures need no failed export: the inputs read on
        # the host (specialized) and whether input-independent tensors are evaluated eagerly.
        self._static_inputs: tuple[str, ...] = tuple(config.static_inputs)
        self._fold_constants = False
        self._traced_scalars: tuple[str, ...] = ()  # int arguments that are symbolic inputs of the graphs
        self._static_scalars: tuple[str, ...] = ()  # int arguments the forward sizes or branches on
        self._check_steps = StepCountCheck(config)  # warns once per N that leaves nothing to skip
        # What the programs were captured with besides the inputs: adapters' state and parameters (compared
        # before each call), and their readable forms (to say what changed).
        self._watch = ModelWatch(model)
        self._captures = 0
        self._check_steps(config.num_steps)

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

    def __getstate__(self):
        # Copies and pickles leave the captured programs behind (fx cannot pickle a graph holding
        # torch.cond: it re-traces the generated code) and capture again on their first call. The state
        # travels: a generation in progress goes on where it was.
        # Prepare hooks registered with ``copied=False`` stay behind (an integration's: ``enable(pipe)``'s
        # would drag the pipeline along, and that pipeline's scheduler still reports to the original).
        state = super().__getstate__()
        uncopied = self.__dict__.get("_uncopied_hooks", set())
        state.update(_programs={}, _current=None, _uncopied_hooks=set(), _prepare_hooks=OrderedDict(
            (key, hook) for key, hook in self._prepare_hooks.items() if key not in uncopied))
        return state

    def _apply(self, fn, recurse=True):
        # .to()/.half() may replace buffers: captured graphs would keep the old ones.
        self._programs.clear()
        self._store.clear()
        self._sized.clear()
        self._current = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"adacache={self.adacache_config}"

    # -- cache contexts and generations -----------------------------------------------------------
    @contextlib.contextmanager
    def cache_context(self, name: str, num_steps: int | None = None, **loop_info):
        """Use a separate cache state inside the block (e.g. ``"cond"`` and ``"uncond"`` of CFG, or one
        request of a server).

        ``num_steps``: this context's own N (a request's step count; the same program, compiled graph or
        ONNX file serves every N); a different N than the context had starts a new generation in it.
        :meth:`release` frees a context. Also accepts the keyword arguments diffusers pipelines pass
        (``step_index``, ``num_inference_steps``, ...): ``num_inference_steps`` sets N for every
        context, and ``step_index=0`` starts a new generation in this context.
        """
        previous = self._store.active
        if num_steps is not None:
            self._store.set_steps(name, num_steps)
            self._check_steps(num_steps)
        self._store.switch(name)
        steps = loop_info.get("num_inference_steps")
        if loop_info.get("step_index") == 0 and steps is not None and self.loop_info_sets_steps:
            self.begin_generation(int(steps))
        try:
            yield
        finally:
            self._store.switch(previous)

    def release(self, context: str) -> None:
        """Free a cache context's state (a finished request): its tensors and its own N are dropped;
        using the name again starts afresh. Raises KeyError for a context that holds nothing."""
        self._store.release(context)

    @property
    def active_context(self) -> str:
        """The cache context the next call uses."""
        return self._store.active

    @property
    def contexts(self) -> list[str]:
        """The cache contexts that ran a call (since the last change of N), in the order first used."""
        return self._store.contexts

    @property
    def generation_contexts(self) -> list[str]:
        """The cache contexts the latest generation used, in the order first used (those :meth:`report`
        reads; the others hold records of an earlier generation)."""
        return self._store.generation_contexts

    @property
    def num_steps(self) -> int | None:
        """N of the current generations (None until known)."""
        return self._store.num_steps

    def begin_generation(self, num_steps: int | None = None) -> None:
        """Start a new generation in the active context on the next call (every context if N changes).
        With fewer than 3 steps (a pipeline may run 2) every step computes."""
        self._store.begin_generation(num_steps)
        self._check_steps(num_steps)

    def reset(self, num_steps: int | None = None) -> None:
        """Start a new generation in every context; optionally change the number of steps N."""
        self._store.reset(num_steps)
        self._check_steps(num_steps)

    # -- hooks ------------------------------------------------------------------------------------
    def register_prepare_hook(self, hook: Callable[[CachedModel, tuple, dict], None], *,
                              copied: bool = True) -> RemovableHandle:
        """Call ``hook(model, args, kwargs)`` eagerly before each call is prepared (also under
        ``torch.compile``, outside the compiled region). ``copied=False``: a copy or a pickle of the model
        leaves the hook behind. Returns a handle with ``remove()``."""
        handle = RemovableHandle(self._prepare_hooks)
        self._prepare_hooks[handle.id] = hook
        if not copied:
            self.__dict__.setdefault("_uncopied_hooks", set()).add(handle.id)
        return handle

    def register_program_hook(self, hook: Callable[[Program], None]) -> RemovableHandle:
        """Call ``hook(program)`` on every captured program: the existing ones now, new ones when
        captured. Returns a handle with ``remove()``."""
        handle = RemovableHandle(self._program_hooks)
        self._program_hooks[handle.id] = hook
        for program in self._programs.values():
            hook(program)
            program.changed()
        return handle

    # -- preparing a call (always eager) ----------------------------------------------------------
    @property
    def programs(self) -> dict[SignatureKey, Program]:
        """The captured programs, by input signature key (read-only view)."""
        return dict(self._programs)

    @property
    def static_inputs(self) -> tuple[str, ...]:
        """The inputs whose values are part of the signature key: named in the config or found by a
        capture (small tensors the model reads on the host)."""
        return self._static_inputs

    @property
    def traced_scalars(self) -> tuple[str, ...]:
        """The Python int arguments that are symbolic inputs of the captured graphs (their values are not
        part of the signature key: a timestep passed as an int)."""
        return self._traced_scalars

    def signature_key(self, args: tuple, kwargs: dict) -> SignatureKey:
        """The key of a call: its input signature (static inputs' values included) and the weights'
        dtype and device."""
        call = signature(args, kwargs, self._static_inputs, self._traced_scalars, self._dynamic.dims)
        param = next(self.model.parameters(), None)
        if param is None:
            return SignatureKey(call, None, "cpu")
        return SignatureKey(call, param.dtype, str(param.device))

    @property
    def captures(self) -> int:
        """How many programs were captured so far (a new signature, a changed adapter state, moved weights)."""
        return self._captures

    def _check_model(self) -> None:
        """Drop the programs when the model changed since they were captured in a way they cannot see: its
        peft adapters (set_adapters, a scale, disable/enable, fuse/unfuse, unload/delete) or its parameters
        replaced (quantize_, a new ``nn.Parameter``). The next call captures the model as it is now."""
        change = self._watch.changed(self.model)
        if change is not None and self._programs:
            logger.info("adacache_fx: the %s of %s changed since the capture (%s): capturing again",
                        change[0], type(self.model).__name__, change[1])
            self._programs.clear()
            self._current = None

    def _capture(self, key, args, kwargs) -> Program:
        group = context_parallel_group(self.model)  # None for one process
        if group is not None:
            check_same_call(group, key.call)
        captured = self._dynamic.capture(self.model, args, kwargs, functional=self.adacache_config.granularity == "branch",
                                         static_inputs=self._static_inputs, fold=self._fold_constants,
                                         static_scalars=self._static_scalars)
        self._fold_constants = captured.folded
        if not self._programs and (note := fast_path_note(self.model)) is not None:
            warnings.warn(f"adacache_fx: {note}", stacklevel=user_stacklevel())
        self._static_scalars = captured.static_scalars
        found = tuple(n for n in captured.static_inputs if n not in self._static_inputs)
        traced = tuple(n for n in captured.traced_scalars if n not in self._traced_scalars)
        if found or traced:  # the key now holds the found inputs' values, and not the traced ints'
            self._static_inputs += found
            self._traced_scalars += traced
        key = self.signature_key(args, kwargs)  # without the sizes the capture keeps symbolic
        try:
            result = rewrite(captured.graph_module, self.adacache_config, group)
        except PassError as error:
            hint = ""
            if captured.static_inputs:  # a stream made a constant of the capture has no residual to cache
                hint = (f" (the capture specialized {list(captured.static_inputs)}, inputs the model reads on the "
                        "host: if one of them is the latent the blocks update, the forward branches on its "
                        "values, which no capture can follow)")
            raise TransformError(f"adacache_fx cannot cache {type(self.model).__name__}: {error}{hint}") from error
        program = Program(captured, result)
        self._captures += 1
        for hook in list(self._program_hooks.values()):
            hook(program)
        program.changed()
        self._programs[key] = program
        self._sized.clear()  # a layout per size again (a new capture may have another)
        self._store.add_layout(key, result.layout, device=key.device)  # the state lives with the weights
        return program

    def prepare_call(self, args: tuple, kwargs: dict) -> tuple[Program, dict[str, torch.Tensor]]:
        """Capture ``model(*args, **kwargs)``'s signature if new, check it against the generation in
        progress and bind the active context's state. Returns ``(program, state)``: call
        ``program.eager(*flat_inputs, *state.values())`` (``program.graph_module`` when tracing). Eager only."""
        for hook in list(self._prepare_hooks.values()):
            hook(self, args, kwargs)
        run_offload_hook(self.model, args, kwargs)  # enable_model_cpu_offload: the model onto its device
        self._check_model()
        key = self.signature_key(args, kwargs)
        program = self._programs.get(key)
        if program is None:
            program = self._capture(key, args, kwargs)
            key = self.signature_key(args, kwargs)  # with the values of inputs the capture specialized
        if program.layout.symbolic:  # a state per concrete size
            key = self._sized_key(program, key, program.captured.flatten_inputs(args, kwargs))
        self._store.use(key)
        self._current = (program, self._store.bound(key))
        return self._current

    def _sized_key(self, program: Program, key: SignatureKey, flat: list) -> SizedKey:
        """The state key of a dynamic-shape call: its sizes solved, and the layout resolved, once per shapes."""
        shapes = (key, tuple(tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)))
        sized = self._sized.get(shapes)
        if sized is None:
            sizes = input_sizes(program.graph_module, flat)
            sized = self._sized[shapes] = SizedKey(key, tuple(sorted(sizes.items())))
            self._store.add_layout(sized, program.layout.resolve(sizes), device=key.device)
        return sized

    def _infer_parameters(self, module, args, kwargs=None):
        """Called eagerly by ``torch.compile(module)`` before each compiled call (see ``_initialize_hook``)."""
        program, state = self.prepare_call(tuple(args), dict(kwargs or {}))
        mark_shapes(program.graph_module, program.layout, program.captured.flatten_inputs(args, kwargs), state)

    def compile(self, *args, **kwargs):
        """Like ``nn.Module.compile``, with the eager preparation of each call kept outside the graph."""
        compiled = torch.compile(self._call_impl, *args, **kwargs)

        def call(*call_args, **call_kwargs):
            program, state = self.prepare_call(call_args, call_kwargs)
            mark_shapes(program.graph_module, program.layout, program.captured.flatten_inputs(call_args, call_kwargs),
                        state)
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
            program, state = self.prepare_call(args, kwargs)
        flat = program.captured.flatten_inputs(args, kwargs)
        run = program.eager if plain_eager() else program.graph_module
        with torch.no_grad():  # an inference transform: reusing residuals has no meaningful gradient
            outputs = run(*flat, *state.values())
        returned = program.layout.returned
        n_user = len(outputs) - len(returned)
        for spec, new in zip(returned, outputs[n_user:]):
            state[spec.name].copy_(new)
        return program.captured.unflatten_outputs(outputs[:n_user])

    # -- introspection ----------------------------------------------------------------------------
    def state(self, context: str | None = None) -> dict[str, torch.Tensor] | None:
        """The state tensors of the signature last used in ``context`` (default: the active one)."""
        last = self._store.last(context)
        return None if last is None else last[1]

    def program(self, context: str | None = None) -> Program | None:
        """The program of the signature last used in ``context`` (default: the active one)."""
        last = self._store.last(context)
        if last is None:
            return None
        return self._programs.get(last[0].key if isinstance(last[0], SizedKey) else last[0])

    def report(self, context: str | None = None) -> Report | list[Report]:
        """Per-step records of the current generation in ``context`` (a list, one per batch row, with
        ``batch_decisions="per_sample"``); reads the state on the host."""
        context = self._store.active if context is None else context
        key, state = self._store.latest(context)
        program = self._programs.get(key.key if isinstance(key, SizedKey) else key)
        if program is None:
            raise RuntimeError("this model is a copy or was unpickled and has not been called yet: it captures its "
                               "program again on its first call, and reports after it")
        always = always_computed(self.adacache_config, int(state["num_steps"]))
        return read_report(state, program.layout, context, program.rewrite.regions, program.rewrite.metric_sites,
                           always_computed=always)
