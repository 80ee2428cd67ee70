"""ONNX export of a transformed model, with its AdaCache state as explicit graph inputs and outputs.

The exported graph is the rewritten program of one call signature::

    (user tensors..., state.step, ..., state.cache_0_0) -> (out.0, ..., state_out.step, ...)

like the KV cache of an LLM engine: the runner feeds the state in and keeps what comes out for the
next step. Each cached region is an ONNX ``If`` node whose predicate is computed from the ``state.*``
inputs, so ONNX Runtime runs only the branch taken. Non-tensor inputs (``return_dict=False``...) are
baked in as constants. The ONNX model's ``metadata_props["adacache_fx"]`` holds what a runner needs
(input and output names, the state layout, the number of steps N, the output structure).

Shapes are static except the number of steps (the rows of ``state.history``): the capture is
specialized to the input shapes, so export one file per input signature.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..api import cached_model
from ..config import AdaCacheConfig
from ..passes.reduce_metric import collectives
from ..state import Report, StateLayout, StateStore, check_num_steps, dtype_from_name, dtype_name, read_report

METADATA_KEY = "adacache_fx"
FORMAT_VERSION = 2
_TENSOR = object()  # marks where a tensor goes in the flat inputs of the export wrapper
_PROGRAM = "program"  # the one signature key of an exported file in the runner's state store


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`to_onnx` wrote: names of the graph's inputs and outputs, regions, stage timings."""

    path: Path
    input_names: list[str]
    output_names: list[str]
    state_names: list[str]
    num_regions: int
    num_if_nodes: int
    num_steps: int
    seconds: dict[str, float] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict, repr=False)


# -- naming and (un)flattening the user call ------------------------------------------------------------
def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_leaves(args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """The flat leaves of a call ``(args, kwargs)`` with readable names: ``hidden_states``, ``arg0``,
    ``added_cond_kwargs.resolution``. Falls back to ``input_{i}`` for containers without key paths."""
    try:
        paths, _ = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    except ValueError:
        return [(f"input_{i}", leaf) for i, leaf in enumerate(pytree.tree_leaves((tuple(args), dict(kwargs))))]
    named = []
    for path, leaf in paths:
        head, rest = path[1], path[2:]
        first = f"arg{_key_name(head)}" if _key_name(path[0]) == "0" else _key_name(head)
        named.append((".".join([first, *(_key_name(k) for k in rest)]), leaf))
    return named


def _children(spec: pytree.TreeSpec) -> list:
    return list(spec.children()) if callable(getattr(spec, "children", None)) else list(spec.children_specs)


def _encode_tree(spec: pytree.TreeSpec):
    """A JSON description of an output tree: tuples, lists, dicts and keyed outputs (diffusers' ``BaseOutput``)."""
    if spec.is_leaf():
        return "leaf"
    kind, children = spec.type, [_encode_tree(c) for c in _children(spec)]
    if kind in (tuple, list):
        return {"type": kind.__name__, "children": children}
    if isinstance(spec.context, list) and all(isinstance(k, str) for k in spec.context):
        name = "dict" if kind is dict else f"{kind.__module__}:{kind.__qualname__}"
        return {"type": name, "keys": list(spec.context), "children": children}
    raise ValueError(
        f"adacache_fx.export cannot describe an output of type {kind.__name__}; call the model with "
        "outputs as tensors, tuples, lists or dicts (e.g. return_dict=False)"
    )


def _decode_tree(desc, leaves):
    """Rebuild the output structure from :func:`_encode_tree`'s description and an iterator of leaves."""
    if desc == "leaf":
        return next(leaves)
    children = [_decode_tree(c, leaves) for c in desc["children"]]
    kind = desc["type"]
    if kind in ("tuple", "list"):
        return tuple(children) if kind == "tuple" else children
    items = dict(zip(desc["keys"], children))
    if kind == "dict":
        return items
    module, qualname = kind.split(":")
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls(**items)


def _as_call(example_inputs, kwargs: dict | None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the example call, as ``torch.export.export`` takes them: a tuple of positional
    arguments (with ``kwargs=``), a kwargs dict, or an ``(args, kwargs)`` pair."""
    if isinstance(example_inputs, dict):
        if kwargs:
            raise TypeError("give keyword inputs either as the example dict or as kwargs=, not both")
        return (), dict(example_inputs)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(
            "example_inputs must be a tuple of positional arguments (keyword ones in kwargs=), a kwargs dict, "
            f"or an (args, kwargs) pair of one denoising step; got {type(example_inputs).__name__}"
        )
    if kwargs is None and len(example_inputs) == 2 and isinstance(example_inputs[0], (tuple, list)) \
            and isinstance(example_inputs[1], dict):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    return tuple(example_inputs), dict(kwargs or {})


# -- export ---------------------------------------------------------------------------------------------
class _StatefulProgram(nn.Module):
    """The rewritten program as ``(user tensors..., state...) -> (user outputs..., new state...)``."""

    def __init__(self, graph_module: nn.Module, template: list):
        super().__init__()
        self.graph_module = graph_module
        self.template = template  # flat user inputs: constants, and _TENSOR where a tensor goes
        self.slots = [i for i, value in enumerate(template) if value is _TENSOR]

    def forward(self, *tensors):
        flat = list(self.template)
        for slot, tensor in zip(self.slots, tensors):
            flat[slot] = tensor
        return tuple(self.graph_module(*flat, *tensors[len(self.slots):]))


def _identity(x):
    """ONNX translation of ``adacache_fx::layout_barrier``: strict export traces with Dynamo, which sees it."""
    import onnxscript

    return onnxscript.opset18.Identity(x)


class _Stages:
    """Times named stages and reports each to ``progress(stage, seconds)``."""

    def __init__(self, progress: Callable[[str, float], None] | None):
        self.progress, self.seconds = progress, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        if self.progress is not None:
            self.progress(name, self.seconds[name])


def _metadata(cached, program, named: list, user_outputs: list) -> dict:
    """What a runner needs, stored as JSON in the ONNX file's ``metadata_props``."""
    return {
        "format": FORMAT_VERSION,
        "model": type(cached.model).__name__,
        "config": cached.adacache_config.to_dict(),
        "num_steps": cached.num_steps,
        "inputs": [
            {"name": name, "kind": "tensor", "shape": list(leaf.shape), "dtype": dtype_name(leaf.dtype)}
            if isinstance(leaf, torch.Tensor) else {"name": name, "kind": "constant", "repr": repr(leaf)}
            for name, leaf in named
        ],
        "outputs": [
            {"name": f"out.{i}", "shape": [int(d) for d in v.shape], "dtype": dtype_name(v.dtype)}
            for i, v in enumerate(user_outputs)
        ],
        "output_tree": _encode_tree(program.captured.out_spec),
        "state": program.layout.to_dict(),  # graph inputs state.<name>, outputs state_out.<name> if returned
        "regions": list(program.rewrite.regions),
        "metric_sites": list(program.rewrite.metric_sites),
    }


def config_from_metadata(metadata: dict) -> AdaCacheConfig:
    """The :class:`~adacache_fx.AdaCacheConfig` an exported file was made with."""
    return AdaCacheConfig.from_dict(metadata["config"])


def to_onnx(
    model,
    example_inputs,
    path: str | Path,
    *,
    kwargs: dict | None = None,
    opset: int | None = None,
    external_data: bool | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> ExportInfo:
    """Export a transformed model for one input signature to an ONNX file, state as inputs and outputs.

    Args:
        model: a :class:`~adacache_fx.CachedModel` (from :func:`adacache_fx.transform`), with its
            number of steps N known (``AdaCacheConfig(num_steps=N)`` or :func:`adacache_fx.reset`).
        example_inputs: the inputs of one denoising step: a tuple of positional arguments (as
            ``torch.export.export`` takes them, keyword ones in ``kwargs``), a dict of keyword
            arguments, or an ``(args, kwargs)`` pair.
            Tensor shapes and dtypes are fixed in the file (one file per input signature; a dynamic
            batch is future work), non-tensor values are baked in as constants.
        path: the ``.onnx`` file to write.
        kwargs: keyword inputs, with a tuple ``example_inputs``.
        opset: ONNX opset version (default: the exporter's).
        external_data: store the weights in a separate file (default: only above 2 GB).
        progress: called as ``progress(stage, seconds)`` after each stage.

    The graph is exported with ``torch.export`` (strict: non-strict export cannot trace the policy
    submodules inside ``torch.cond`` branches) and ``torch.onnx.export(dynamo=True)``; each cached
    region becomes an ``If`` node, checked against the number of regions, and the file passes
    ``onnx.checker``. Run it with :class:`OnnxRunner`.
    """
    import onnx

    cached = cached_model(model)
    args, kwargs = _as_call(example_inputs, kwargs)
    if cached.num_steps is None:
        raise ValueError("the number of steps N is unknown: set AdaCacheConfig(num_steps=N) or adacache_fx.reset(model, N)")
    num_steps, path = cached.num_steps, Path(path)
    stage = _Stages(progress)
    with torch.no_grad():
        with stage("capture + rewrite"):
            program, _ = cached.prepare_call(args, kwargs)
        if collectives(program.graph_module):
            raise ValueError(
                "ONNX export of a model under context parallelism is not supported: its graph holds "
                "torch.distributed collectives (all-to-all, all-gather, the metric's all-reduce), which have "
                "no ONNX op; export the model without enable_parallelism"
            )
        named = named_leaves(args, kwargs)
        tensors = [(name, leaf) for name, leaf in named if isinstance(leaf, torch.Tensor)]
        device = tensors[0][1].device if tensors else torch.device("cpu")
        layout = program.layout
        state = list(layout.allocate(num_steps, device).values())  # a fresh generation's, not the live one
        wrapper = _StatefulProgram(
            program.graph_module, [_TENSOR if isinstance(leaf, torch.Tensor) else leaf for _, leaf in named]
        )
        inputs = tuple(t for _, t in tensors) + tuple(state)
        dynamic = [None] * len(inputs)
        for i, spec in enumerate(layout):
            if spec.shape is None:
                dynamic[len(tensors) + i] = {0: torch.export.Dim("num_steps", min=3)}
        with stage("torch.export (strict)"):
            exported = torch.export.export(wrapper, inputs, dynamic_shapes=(tuple(dynamic),), strict=True)

        returned = layout.returned
        out_values = [node.meta["val"] for node in exported.graph.output_node().args[0]]
        n_user = len(out_values) - len(returned)
        user_outputs = out_values[:n_user]
        if not all(isinstance(v, torch.Tensor) for v in user_outputs):
            raise ValueError("adacache_fx.export supports models whose outputs are all tensors")
        output_names = [f"out.{i}" for i in range(n_user)] + [f"state_out.{spec.name}" for spec in returned]
        input_names = [name for name, _ in tensors] + [f"state.{name}" for name in layout.names]
        with stage("ONNX translation"):
            onnx_program = torch.onnx.export(
                exported,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                custom_translation_table={torch.ops.adacache_fx.layout_barrier.default: _identity},
                optimize=True,
                verbose=False,
            )

    metadata = _metadata(cached, program, named, user_outputs)
    with stage("save"):
        ir_model = onnx_program.model
        for value in [*ir_model.graph.inputs, *ir_model.graph.outputs]:
            if value.name in ("state.history", "state_out.history") and value.shape is not None:
                value.shape = type(value.shape)(["num_steps", *value.shape[1:]])
        ir_model.metadata_props[METADATA_KEY] = json.dumps(metadata)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx_program.save(str(path), external_data=external_data)
    with stage("onnx.checker"):
        onnx.checker.check_model(str(path))
        graph = onnx.load(str(path), load_external_data=False).graph
        num_if = sum(node.op_type == "If" for node in graph.node)
    if num_if != len(program.rewrite.regions):
        raise RuntimeError(
            f"the exported graph has {num_if} If nodes for {len(program.rewrite.regions)} cached regions: "
            "the exporter resolved a conditional at export time, so cached steps would not skip work"
        )
    return ExportInfo(
        path, [name for name, _ in tensors], output_names[:n_user], layout.names,
        len(program.rewrite.regions), num_if, num_steps, stage.seconds, metadata,
    )


def read_metadata(path: str | Path) -> dict:
    """The ``adacache_fx`` metadata of an ONNX file written by :func:`to_onnx`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise ValueError(f"{path} was not written by adacache_fx.export.to_onnx (no {METADATA_KEY!r} metadata)")


# -- running --------------------------------------------------------------------------------------------
class StatefulRunner:
    """Base of the runners: checks the call, keeps the state per cache context, rebuilds the outputs.

    The state lives in a :class:`~adacache_fx.state.StateStore` with the exported layout. Each context
    also has a spare set of the returned state tensors: the engine reads one set and writes the
    other, then they swap, so no state is allocated or copied per step. Subclasses implement
    :meth:`_execute`.
    """

    def __init__(self, metadata: dict, device: torch.device, num_steps: int | None = None):
        if metadata.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"unsupported adacache_fx export format {metadata.get('format')!r} (this version reads "
                f"{FORMAT_VERSION}): export the model again"
            )
        self.metadata = metadata
        self.device = torch.device(device)
        self.layout = StateLayout.from_dict(metadata["state"])
        self._store = StateStore(check_num_steps(num_steps) if num_steps is not None else metadata["num_steps"])
        self._store.add_layout(_PROGRAM, self.layout, self.device)
        self._spare: dict[str, dict[str, torch.Tensor]] = {}

    def _execute(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run the engine: read ``feeds`` and write into the preallocated ``outputs`` (by name)."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self._store.num_steps

    @property
    def contexts(self) -> list[str]:
        """The cache contexts that hold state."""
        return self._store.contexts

    def state(self, context: str | None = None) -> dict[str, torch.Tensor]:
        """The current state tensors of a cache context (default: the active one), by spec name."""
        return dict(self._store.get(_PROGRAM, context))

    def load_state(self, state: dict[str, torch.Tensor], context: str | None = None) -> None:
        """Copy state tensors in (e.g. a :class:`~adacache_fx.CachedModel`'s ``state()``).

        Raises ValueError naming the state tensor whose shape or dtype is not the exported one."""
        unknown = sorted(set(state) - set(self.layout.names))
        if unknown:
            raise ValueError(f"unknown state tensors {unknown}; this model's state is {self.layout.names}")
        for name, value in state.items():
            spec = self.layout.spec(name)
            expected = (spec.shape_for(self.num_steps), dtype_name(spec.dtype))
            if not isinstance(value, torch.Tensor) or (tuple(value.shape), dtype_name(value.dtype)) != expected:
                got = (tuple(value.shape), dtype_name(value.dtype)) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"state tensor {name!r}: expected shape {expected[0]} dtype {expected[1]}, got {got}")
        current = self._store.get(_PROGRAM, context)
        for name, value in state.items():
            current[name].copy_(value)

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """Use a separate cache state inside the block (e.g. ``"cond"`` and ``"uncond"`` of CFG)."""
        previous = self._store.active
        self._store.active = name
        try:
            yield
        finally:
            self._store.active = previous

    def reset(self, num_steps: int | None = None) -> None:
        """Start a new generation in every context; optionally change the number of steps N."""
        if num_steps is not None and check_num_steps(num_steps) != self.num_steps:
            self._spare.clear()
        self._store.reset(num_steps)

    def report(self, context: str | None = None) -> Report:
        """Per-step records of the current generation, as :func:`adacache_fx.report` gives them."""
        context = self._store.active if context is None else context
        if context not in self._store.contexts:
            raise RuntimeError(f"no generation has run in cache context {context!r} yet (contexts: {self.contexts})")
        meta = self.metadata
        return read_report(self._store.get(_PROGRAM, context), self.layout, context, meta["regions"],
                           meta["metric_sites"])

    # -- the call ------------------------------------------------------------------------------------
    def _user_feeds(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        given = dict(named_leaves(args, kwargs))
        expected = [item["name"] for item in self.metadata["inputs"]]
        if set(given) != set(expected):
            raise ValueError(
                f"this model was exported for the inputs {expected}; got {list(given)} "
                "(call it with the same arguments, positional or keyword, as the export example)"
            )
        feeds = {}
        for item in self.metadata["inputs"]:
            name, value = item["name"], given[item["name"]]
            if item["kind"] == "constant":
                if repr(value) != item["repr"]:
                    raise ValueError(f"input {name!r}: exported with the constant {item['repr']} baked in, got {value!r}")
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"input {name!r}: expected a tensor, got {type(value).__name__}")
            if list(value.shape) != item["shape"] or dtype_name(value.dtype) != item["dtype"]:
                raise ValueError(
                    f"input {name!r}: expected shape {tuple(item['shape'])} dtype {item['dtype']}, "
                    f"got shape {tuple(value.shape)} dtype {dtype_name(value.dtype)} (the export is shape-specialized)"
                )
            feeds[name] = value.to(self.device).contiguous()
        return feeds

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        feeds = self._user_feeds(args, kwargs)
        current = self._store.get(_PROGRAM)
        following = self._spare.get(self._store.active)
        if following is None:  # a state never written back is shared by both sets
            fresh = self.layout.allocate(self.num_steps, self.device)
            following = {spec.name: fresh[spec.name] if spec.returned else current[spec.name] for spec in self.layout}
        outputs = {
            out["name"]: torch.empty(out["shape"], dtype=dtype_from_name(out["dtype"]), device=self.device)
            for out in self.metadata["outputs"]
        }
        for spec in self.layout:
            feeds[f"state.{spec.name}"] = current[spec.name]
            if spec.returned:
                outputs[f"state_out.{spec.name}"] = following[spec.name]
        self._execute(feeds, outputs)
        self._store.replace(_PROGRAM, following)
        self._spare[self._store.active] = current
        user = iter(outputs[out["name"]] for out in self.metadata["outputs"])
        return _decode_tree(self.metadata["output_tree"], user)


_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class OnnxRunner(StatefulRunner):
    """Run a file from :func:`to_onnx` with ONNX Runtime, keeping the AdaCache state between calls.

    Called like the torch model (``runner(hidden_states=..., timestep=..., ..., return_dict=False)``)
    with the example's shapes, it returns what the model returns, as torch tensors. Inputs and
    outputs are bound by pointer (IO binding), so the state never leaves the device: CPU tensors
    with ``CPUExecutionProvider`` (the default), CUDA tensors with ``CUDAExecutionProvider`` or
    ``TensorrtExecutionProvider`` (``pip install adacache-fx[gpu]``).

    Args:
        path: the ``.onnx`` file.
        providers: ONNX Runtime execution providers, names or ``(name, options)`` pairs.
        num_steps: N of a generation (default: the export's); :meth:`reset` changes it.
        session_options: an ``onnxruntime.SessionOptions`` (threads, profiling...).
    """

    def __init__(self, path: str | Path, providers=None, num_steps: int | None = None, session_options=None):
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise RuntimeError("OnnxRunner needs onnxruntime: pip install adacache-fx[cpu] (or [gpu])") from error
        providers = list(providers or ["CPUExecutionProvider"])
        names = [p if isinstance(p, str) else p[0] for p in providers]
        missing = [n for n in names if n not in ort.get_available_providers()]
        if missing:
            raise RuntimeError(
                f"ONNX Runtime providers {missing} are not available (available: {ort.get_available_providers()}); "
                "for CUDA/TensorRT install onnxruntime-gpu: pip install adacache-fx[gpu]"
            )
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3  # errors only: not the exporter's unused-initializer notes
        self.session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path} was not written by adacache_fx.export.to_onnx (no {METADATA_KEY!r} metadata)")
        gpu = next((p for p, n in zip(providers, names) if n in _GPU_PROVIDERS), None)
        if gpu is not None:
            options = gpu[1] if not isinstance(gpu, str) else {}
            device = torch.device("cuda", int(options.get("device_id", 0)))
        else:
            device = torch.device("cpu")
        super().__init__(json.loads(raw), device, num_steps)
        self._binding = self.session.io_binding()

    def _execute(self, feeds, outputs):
        import numpy as np

        kind, index = self.device.type, self.device.index or 0
        binding = self._binding
        for bind, tensors in ((binding.bind_input, feeds), (binding.bind_output, outputs)):
            for name, tensor in tensors.items():
                if tensor.dtype == torch.bfloat16:
                    raise ValueError(f"{name!r}: bfloat16 inputs and outputs cannot be bound; export in float16 or float32")
                element = np.dtype(str(tensor.dtype).removeprefix("torch."))
                bind(name, kind, index, element, tuple(tensor.shape), tensor.data_ptr())
        if kind == "cuda":
            torch.cuda.synchronize(self.device)  # inputs written by torch's stream; ORT syncs its own at the end
        self.session.run_with_iobinding(binding)
