"""One-line use with diffusers pipelines: ``adacache_fx.enable(pipe)`` / ``adacache_fx.disable(pipe)``.

Imports nothing from diffusers: a pipeline is used through its components (the denoisers: ``transformer``,
``transformer_2``, ...), its ``scheduler`` and its ``config``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref

from torch import nn

from ..api import cached_model, transform
from ..module import CachedModel
from ..policies import AdaCacheConfig
from ..report import Report
from ..steps import user_stacklevel
from .scheduler import hook, hooked, unhook


def denoisers(pipe) -> dict[str, nn.Module]:
    """The pipeline's denoiser components, by name: the ``nn.Module`` components named ``transformer*``
    (``pipe.components``; a plain object's ``transformer`` attribute otherwise)."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        components = {"transformer": getattr(pipe, "transformer", None)}
    return {name: module for name, module in components.items()
            if name.startswith("transformer") and isinstance(module, nn.Module)}


def boundary_timestep(pipe) -> float | None:
    """The timestep where a two-expert pipeline switches from ``transformer`` to ``transformer_2``:
    ``config.boundary_ratio * scheduler.config.num_train_timesteps`` (diffusers' Wan2.2 pipelines route
    ``t >= boundary`` to ``transformer``, the rest to ``transformer_2``), or None without a ``boundary_ratio``."""
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if ratio is None:
        return None
    return float(ratio) * pipe.scheduler.config.num_train_timesteps



#: The generation follower of each model ``enable`` transformed, with its hook's handle: the integration's
#: own state (the model holds only the hook, which its copies leave behind).
_FOLLOWERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

class GenerationFollower:
    """A prepare hook that starts a new generation (in every cache context) when the pipeline starts one.

    Signals, from the pipeline's own objects: a call of ``scheduler.set_timesteps`` (wrapped here; every
    diffusers pipeline calls it once before its loop, whether or not the scheduler has a ``step_index``)
    and a scheduler replaced since the last call. The pipeline's ``cache_context(..., step_index=0,
    num_inference_steps=N)`` calls are followed by :meth:`CachedModel.cache_context` itself. N is the
    number of calls a denoiser gets per cache context: the scheduler's timesteps from its ``begin_index``
    (img2img pipelines start later), else the pipeline's ``num_timesteps``; with two experts split at a
    boundary timestep (:func:`boundary_timestep`), those on each side of it.

    One follower serves every denoiser of a pipeline (``names``: model id -> component name); a model it
    does not know is the pipeline's only denoiser.
    """

    def __init__(self, pipe, names: dict[int, str] | None = None):
        self.pipe = pipe
        self.names = dict(names or {})
        self.scheduler = None  # the scheduler whose set_timesteps is wrapped
        self.generation = 0  # counts set_timesteps calls (and scheduler swaps)
        self.started: dict[str | None, int] = {}  # denoiser -> the generation it last started
        self.calls: dict[tuple[str | None, str], int] = {}  # (denoiser, context) -> calls in this generation
        self.steps: dict[str | None, int] = {}  # denoiser -> its N in this generation
        self.warned: set[str] = set()
        self.in_step: dict[tuple[str | None, str], int] = {}  # (denoiser, context) -> calls since the last step
        self.routed: dict[CachedModel, tuple[str, contextlib.AbstractContextManager]] = {}
        self.watch(pipe.scheduler)

    def watch(self, scheduler) -> None:
        """Hook ``scheduler.set_timesteps`` and ``scheduler.step`` (on the instance; :meth:`unwatch` removes them)."""
        self.unwatch()
        self.scheduler = scheduler
        hook(scheduler, "set_timesteps", self.timesteps_set, self)
        hook(scheduler, "step", self.stepped, self)

    def unwatch(self) -> None:
        if self.scheduler is not None:
            unhook(self.scheduler, "set_timesteps", self)
            unhook(self.scheduler, "step", self)
        self.scheduler = None

    def timesteps_set(self) -> None:
        """A generation starts; the pipeline's ``_num_timesteps`` from before it is marked as such."""
        self.generation += 1
        self.stepped()
        attributes = getattr(self.pipe, "__dict__", {})
        if type(attributes.get("_num_timesteps")) is int:
            attributes["_num_timesteps"] = _Earlier(attributes["_num_timesteps"])

    def stepped(self) -> None:
        """A scheduler step ended: the calls of the next one are counted afresh."""
        self.in_step.clear()
        self.unroute()

    def unroute(self) -> None:
        """Every call routed to a context of its own goes back to the pipeline's context."""
        for model, (routed, manager) in list(self.routed.items()):
            if model.active_context == routed:
                manager.__exit__(None, None, None)
        self.routed.clear()

    def route(self, name: str | None, model: CachedModel) -> None:
        """The k-th call of a denoiser in one cache context within one scheduler step (k >= 2: a pipeline
        running CFG's halves as two calls outside any cache context, HunyuanVideo I2V) runs in cache
        context ``"<context>#k"``, with a state of its own, until the scheduler's next step."""
        self.unroute()
        key = (name, model.active_context)
        k = self.in_step[key] = self.in_step.get(key, 0) + 1
        if k == 1 or not hooked(self.scheduler, "step", self):
            return
        n = self.steps.get(name)
        if n is not None and k > n:  # more calls than steps and no step between them: steps we do not see
            self.warn_once(f"steps:{name}", (
                f"adacache_fx: {k} calls in cache context {key[1]!r} without a call of "
                f"{type(self.scheduler).__name__}.step between them: the pipeline steps a scheduler adacache_fx "
                "does not see, so its calls are not told apart (each is a step of one generation)"
            ))
            return
        routed = f"{key[1]}#{k}"
        manager = model.cache_context(routed)
        manager.__enter__()
        self.routed[model] = (routed, manager)

    def num_steps(self, name: str | None = None) -> int | None:
        """N of denoiser ``name`` in the generation the scheduler set up."""
        own = getattr(self.pipe, "__dict__", {}).get("_num_timesteps")
        if name is None and isinstance(own, int) and not isinstance(own, _Earlier):
            return int(own)  # set by the pipeline for this generation: its loop's length
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return getattr(self.pipe, "num_timesteps", None)
        timesteps = timesteps[getattr(self.pipe.scheduler, "begin_index", None) or 0:]
        boundary = boundary_timestep(self.pipe) if name is not None else None
        if boundary is None:
            return len(timesteps)
        high = int((timesteps >= boundary).sum())
        return high if name == "transformer" else len(timesteps) - high

    def in_generation(self, name: str) -> bool:
        """Whether denoiser ``name`` ran in the pipeline's latest generation."""
        return self.started.get(name) == self.generation

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=user_stacklevel())

    def __call__(self, model: CachedModel, args: tuple, kwargs: dict) -> None:
        name = self.names.get(id(model))
        scheduler = self.pipe.scheduler
        if scheduler is not self.scheduler:  # replaced since enable() or since the last call
            self.watch(scheduler)
            self.generation += 1
        if self.scheduler_unwatched():
            scheduler_name = type(scheduler).__name__
            self.warn_once(scheduler_name, (
                f"adacache_fx.enable cannot tell where a generation starts with {scheduler_name} (it has no "
                "set_timesteps): a generation ends after N calls in each cache context; call "
                "adacache_fx.reset(pipe.transformer) before a generation that follows an interrupted one"
            ))
        if self.started.get(name, 0) != self.generation or model.num_steps is None:
            self.start(name, model)
        self.route(name, model)
        self.count(name, model)

    def start(self, name: str | None, model: CachedModel) -> None:
        self.started[name] = self.generation
        self.calls = {k: v for k, v in self.calls.items() if k[0] != name}
        n = self.num_steps(name)
        if n is None:
            return
        self.steps[name] = n
        if n < 3:
            who = f"{name}: " if len(self.names) > 1 else ""
            warnings.warn(
                f"adacache_fx: {who}{n} denoising step(s), fewer than 3: every step computes (nothing is cached)",
                stacklevel=user_stacklevel(),
            )
        model.reset()  # every context starts over, also after an interrupted generation
        model.begin_generation(max(int(n), 1))

    def count(self, name: str | None, model: CachedModel) -> None:
        """Say so (once) when a denoiser gets more calls in a context than the N it was given."""
        key = (name, model.active_context)
        calls = self.calls[key] = self.calls.get(key, 0) + 1
        n = self.steps.get(name)
        if n is not None and calls > n and len(self.names) > 1:
            self.warn_once(f"calls:{name}", (
                f"adacache_fx: {name} was called {calls} times in cache context {key[1]!r} of one generation, more "
                f"than the {n} steps the pipeline's boundary_ratio gives it: its schedule restarts and its report "
                "covers the last steps only"
            ))

    def scheduler_unwatched(self) -> bool:
        return not hooked(self.scheduler, "set_timesteps", self)


class _Earlier(int):
    """The pipeline's ``_num_timesteps`` of an earlier generation (the same value, marked when the scheduler's
    timesteps are set: a pipeline that sets it again for this generation replaces it with a plain int)."""


def component_methods(pipe) -> list[str]:
    """The pipeline's public methods that act on its components by type: those its classes from
    ``diffusers.loaders`` define (``load_lora_weights``, ``set_adapters``, ``fuse_lora``,
    ``unload_lora_weights``...) and those that install or remove hooks (``enable_model_cpu_offload``,
    ``enable_group_offload``, ``maybe_free_model_hooks``, ``remove_all_hooks``, ``reset_device_map``...)."""
    names = []
    for cls in type(pipe).__mro__:
        loaders = cls.__module__.startswith("diffusers.loaders")
        for name, value in vars(cls).items():
            if name.startswith("_") or not callable(value) or isinstance(value, (classmethod, staticmethod)):
                continue
            if loaders or "offload" in name or name.endswith(("hooks", "device_map")):
                names.append(name)
    return sorted(set(names))


@contextlib.contextmanager
def original_denoisers(pipe):
    """The pipeline's original denoisers in place of the transformed ones for the duration of the block.
    diffusers' loader methods act on components that are ``ModelMixin`` instances and skip the others; its
    offloading methods put their hooks on the models themselves."""
    found = enabled_denoisers(pipe)
    for name, cached in found.items():
        pipe.__dict__[name] = cached.model
    try:
        yield
    finally:
        for name, cached in found.items():
            pipe.__dict__[name] = cached


def wrap_component_methods(pipe) -> None:
    """Make the pipeline's methods that act on components (see :func:`component_methods`) act on the original
    denoisers: the transformed ones see an adapter change on their next call (:mod:`adacache_fx.adapters`)
    and run a model-level offload hook themselves (:mod:`adacache_fx.capture.hooks`)."""
    for name in component_methods(pipe):
        original = getattr(pipe, name)

        @functools.wraps(original)
        def call(*args, _original=original, **kwargs):
            with original_denoisers(pipe):
                return _original(*args, **kwargs)

        call.adacache_loader = True
        pipe.__dict__[name] = call


def unwrap_component_methods(pipe) -> None:
    for name, value in list(vars(pipe).items()):
        if getattr(value, "adacache_loader", False):
            del pipe.__dict__[name]


def enable(pipe, config: AdaCacheConfig | None = None) -> CachedModel:
    """Transform the pipeline's denoisers with AdaCache and follow the pipeline's generations.

    Every pipeline call starts a new generation in every cache context, with N the number of
    timesteps the scheduler set (``num_inference_steps`` for most schedulers), whatever the scheduler.
    Classifier-free guidance: pipelines that run the two halves as separate calls under
    ``cache_context("cond")`` / ``("uncond")`` get a state (and decisions) per half; a batched call
    (``cache_context("cond_uncond")``) shares one. Fewer than 3 steps: every step computes, with a
    warning. Two experts split by ``config.boundary_ratio`` (Wan2.2 A14B: ``transformer`` and
    ``transformer_2``): each is transformed, with its own state, contexts and N (its share of the
    timesteps). Several denoisers without a known split: ``transformer`` only, with a warning.
    The pipeline's LoRA and offloading methods (``load_lora_weights``, ``set_adapters``, ``fuse_lora``,
    ``enable_model_cpu_offload``...) act on the original denoisers; the transformed ones capture again when
    the adapters changed, and run a model-level offload hook before each call.
    Returns the transformed ``transformer`` (``adacache_fx.report(pipe)`` reads every denoiser).

    >>> import torch, adacache_fx
    >>> from adacache_fx.tools.fixtures import tiny_wan_pipeline  # a stock WanPipeline, tiny and random
    >>> pipe = tiny_wan_pipeline()
    >>> pipe.set_progress_bar_config(disable=True)
    >>> cached = adacache_fx.enable(pipe)
    >>> embeds = torch.randn(1, 8, 32)
    >>> video = pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=16, width=16, num_frames=5,
    ...              num_inference_steps=12, output_type="pt").frames
    >>> report = adacache_fx.report(cached, "cond")
    >>> report.num_steps, report.num_computed < 12
    (12, True)
    >>> adacache_fx.disable(pipe)
    """
    found = denoisers(pipe)
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no `transformer` to cache")
    if any(isinstance(getattr(m, "_orig_mod", m), CachedModel) for m in found.values()):
        raise ValueError("AdaCache is already enabled on this pipeline; call adacache_fx.disable(pipe) first")
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "timesteps"):
        raise ValueError(f"{type(pipe).__name__} has no scheduler with timesteps to take N from")
    split = len(found) > 1 and boundary_timestep(pipe) is not None and set(found) <= {"transformer", "transformer_2"}
    if len(found) > 1 and not split:
        kept = "transformer" if "transformer" in found else next(iter(found))
        others = ", ".join(name for name in found if name != kept)
        warnings.warn(
            f"adacache_fx.enable: {type(pipe).__name__} has several denoisers ({', '.join(found)}) and no "
            f"boundary_ratio in its config to tell which steps each runs: only `{kept}` is cached (N = all the "
            f"scheduler's timesteps); {others} run uncached. Transform them yourself with adacache_fx.transform "
            "and set N with adacache_fx.reset(model, num_steps=N)",
            stacklevel=2,
        )
        found = {kept: found[kept]}
    cached = {name: transform(module, config) for name, module in found.items()}
    follower = GenerationFollower(pipe, {id(model): name for name, model in cached.items()} if split else None)
    for name, model in cached.items():
        _FOLLOWERS[model] = (follower, model.register_prepare_hook(follower, copied=False))
        if split:  # the pipeline's cache_context(num_inference_steps=all steps) is not this expert's N
            model.loop_info_sets_steps = False
        setattr(pipe, name, model)
    wrap_component_methods(pipe)
    return cached.get("transformer", next(iter(cached.values())))


def enabled_denoisers(pipe) -> dict[str, CachedModel]:
    """The pipeline's transformed denoisers, by component name."""
    found = {}
    for name, module in denoisers(pipe).items():
        try:
            found[name] = cached_model(module)
        except TypeError:
            continue
    return found


def pipeline_report(pipe, context: str | None = None) -> dict:
    """The reports of every denoiser that ran in the pipeline's latest generation: ``{name: {context:
    Report}}`` over the contexts it used, or ``{name: Report}`` of one ``context``."""
    found = enabled_denoisers(pipe)
    if not found:
        raise ValueError("AdaCache is not enabled on this pipeline")
    reports: dict[str, dict[str, Report] | Report] = {}
    for name, model in found.items():
        follower = _FOLLOWERS.get(model, (None,))[0]
        if follower is not None and len(follower.names) > 1 and not follower.in_generation(name):
            continue  # this expert got no step in the latest generation: its records are older
        if not model.generation_contexts:
            continue
        if context is None:
            reports[name] = {c: model.report(c) for c in model.generation_contexts}
        elif context in model.generation_contexts:
            reports[name] = model.report(context)
    return reports


def disable(pipe) -> None:
    """Restore the pipeline's original denoisers and scheduler (every wrapping undone)."""
    found = enabled_denoisers(pipe)
    if not found:
        raise ValueError("AdaCache is not enabled on this pipeline")
    unwrap_component_methods(pipe)
    for name, inner in found.items():
        follower, handle = _FOLLOWERS.pop(inner, (None, None))
        if follower is not None:
            handle.remove()
            follower.unwatch()
        inner.__dict__.pop("loop_info_sets_steps", None)
        setattr(pipe, name, inner.model)
