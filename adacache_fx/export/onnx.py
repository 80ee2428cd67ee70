"""ONNX export of a transformed model, with its AdaCache state as explicit graph inputs and outputs.

The exported graph is the rewritten program of one call signature::

    (user tensors..., state.step, ..., state.cache_0_0) -> (out.0, ..., state_out.step, ...)

like the KV cache of an LLM engine: the runner (:mod:`.runner`) feeds the state in and keeps what comes out for the
next step. Each cached region is an ONNX ``If`` node whose predicate is computed from the ``state.*``
inputs, so ONNX Runtime runs only the branch taken. Non-tensor inputs (``return_dict=False``...) and
static inputs (small tensors the model reads on the host, see :mod:`adacache_fx.capture`) are baked in
as constants; the runner refuses a call whose static input has another value. The ONNX model's
``metadata_props["adacache_fx"]`` holds what a runner needs (input and output names, the state
layout, the number of steps N, the output structure).

Shapes are static except the number of steps (the rows of ``state.history``): the capture is
specialized to the input shapes, so export one file per input signature.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..api import cached_model
from ..capture import named_leaves
from ..capture.dynamic import input_sizes, symbolic_dims
from ..config import CacheConfig, config_from_dict
from ..passes.reduce_metric import collectives
from ..state import dtype_name
from .prepare import prepare
from .profiles import TARGETS, TENSORRT_MAX_OPSET, apply_tensorrt_profile
from .validate import validate as validate_file

METADATA_KEY = "adacache_fx"
FORMAT_VERSION = 4  # 3: the history spec names its columns; 4: and its batch rows (per-sample decisions)
_TENSOR = object()  # marks where a tensor goes in the flat inputs of the export wrapper


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
    profile: dict[str, int] = field(default_factory=dict)  # what the target's profile changed
    prepared: dict[str, str] = field(default_factory=dict)  # each export-preparation stage's summary
    validated: tuple[str, ...] = ()  # the checks the file passed


# -- naming and (un)flattening the user call ------------------------------------------------------------
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


def decode_tree(desc, leaves):
    """Rebuild the output structure from :func:`_encode_tree`'s description and an iterator of leaves."""
    if desc == "leaf":
        return next(leaves)
    children = [decode_tree(c, leaves) for c in desc["children"]]
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


def _input_entry(name: str, leaf, static: tuple[str, ...]) -> dict:
    if not isinstance(leaf, torch.Tensor):
        return {"name": name, "kind": "constant", "repr": repr(leaf)}
    entry = {"name": name, "kind": "tensor", "shape": list(leaf.shape), "dtype": dtype_name(leaf.dtype)}
    if name in static:  # a constant of the graph: the file holds it for this value only
        entry.update(kind="static", value=leaf.reshape(-1).tolist())
    return entry


def _metadata(cached, program, named: list, user_outputs: list, shapes: list) -> dict:
    """What a runner needs, stored as JSON in the ONNX file's ``metadata_props``.

    ``shapes``: the exported shapes of the tensor inputs, then of the state. A file with dynamic axes (a
    dynamic-shape capture) has sizes that are expressions (str) of the export's size symbols: an input's
    ``shape``, the outputs' and ``exported_state``'s use them; an input's ``sizes`` are the capture's, in
    which the ``state`` layout is written (a runner allocates each call's state from those)."""
    layout = program.layout
    symbolic = symbolic_dims(program.graph_module)
    inputs, shapes = [], iter(shapes)
    for (name, leaf), dims, node in zip(named, symbolic, program.graph_module.graph.find_nodes(op="placeholder")):
        entry = _input_entry(name, leaf, program.captured.static_inputs)
        if entry["kind"] == "tensor":
            entry["shape"] = next(shapes)
            if dims:
                entry["sizes"] = _sizes(node.meta["val"].shape)
        inputs.append(entry)
    state_shapes = dict(zip(layout.names, shapes))
    return {
        "format": FORMAT_VERSION,
        "model": type(cached.model).__name__,
        "config": cached.adacache_config.to_dict(),
        "num_steps": cached.num_steps,
        "inputs": inputs,
        "outputs": [
            {"name": f"out.{i}", "shape": _sizes(v.shape), "dtype": dtype_name(v.dtype)}
            for i, v in enumerate(user_outputs)
        ],
        "output_tree": _encode_tree(program.captured.out_spec),
        "state": layout.to_dict(),  # graph inputs state.<name>, outputs state_out.<name> if returned
        "exported_state": {spec.name: state_shapes[spec.name] for spec in layout
                           if layout.symbolic and spec.shape is not None},
        "regions": list(program.rewrite.regions),
        "metric_sites": list(program.rewrite.metric_sites),
    }


def _sizes(shape) -> list[int | str]:
    return [d if isinstance(d, int) else str(d.node.expr) for d in shape]


def _dynamic_axes(program, named: list, static, layout) -> list:
    """``torch.export``'s ``dynamic_shapes`` of the exported inputs: the history's rows (N), and the dims a
    dynamic-shape capture keeps symbolic (``Dim.AUTO``: the export finds how they relate)."""
    dims = symbolic_dims(program.graph_module)
    auto = torch.export.Dim.AUTO
    axes = [{d: auto for d in dims[i]} or None for i, (name, leaf) in enumerate(named)
            if isinstance(leaf, torch.Tensor) and name not in static]
    for spec in layout:
        if spec.shape is None:
            axes.append({0: torch.export.Dim("num_steps", min=3)})
        else:
            axes.append({d: auto for d, size in enumerate(spec.shape) if isinstance(size, str)} or None)
    return axes


def _user_shapes(exported, count: int) -> list[list[int | str]]:
    """The shapes of the first ``count`` user inputs of an exported program."""
    names = exported.graph_signature.user_inputs
    values = {n.name: n.meta["val"] for n in exported.graph.find_nodes(op="placeholder")}
    return [_sizes(values[name].shape) for name in names[:count]]


def config_from_metadata(metadata: dict) -> CacheConfig:
    """The config (an :class:`~adacache_fx.AdaCacheConfig` or another policy's) an exported file was made with."""
    return config_from_dict(metadata["config"])


def to_onnx(
    model,
    example_inputs,
    path: str | Path,
    *,
    kwargs: dict | None = None,
    opset: int | None = None,
    external_data: bool | None = None,
    progress: Callable[[str, float], None] | None = None,
    target: str | None = None,
    validate: bool | Sequence[str] | None = None,
) -> ExportInfo:
    """Export a transformed model for one input signature to an ONNX file, state as inputs and outputs.

    Args:
        model: a :class:`~adacache_fx.CachedModel` (from :func:`adacache_fx.transform`), with its
            number of steps N known (``AdaCacheConfig(num_steps=N)`` or :func:`adacache_fx.reset`).
        example_inputs: the inputs of one denoising step: a tuple of positional arguments (as
            ``torch.export.export`` takes them, keyword ones in ``kwargs``), a dict of keyword
            arguments, or an ``(args, kwargs)`` pair.
            Tensor shapes and dtypes are fixed in the file (one file per input signature), except the
            sizes a dynamic-shape transform (``transform(..., dynamic_shapes=...)``) keeps symbolic: those
            are dynamic axes, and a runner allocates the state for each size it is called with.
            Non-tensor values are baked in as constants.
        path: the ``.onnx`` file to write.
        kwargs: keyword inputs, with a tuple ``example_inputs``.
        opset: ONNX opset version (default: the exporter's).
        external_data: store the weights in a separate file (default: only above 2 GB).
        progress: called as ``progress(stage, seconds)`` after each stage.
        target: ``"tensorrt"`` applies the TensorRT profile (:mod:`adacache_fx.export.profiles`: default-valued
            attributes dropped in every subgraph, opset capped, shared constants duplicated per branch);
            None or ``"onnxruntime"``: the exporter's output as is.
        validate: the ONNX Runtime providers to create a session with before returning: True (or None
            without a target): the CPU provider; a list: those; False (or None with ``target="tensorrt"``):
            none, and shape inference then checks shapes, not the ONNX schema's types (TensorRT's parser
            takes bfloat16 where the schema does not). ``onnx.checker`` and strict shape inference always run.

    The graph is exported with ``torch.export`` (strict: non-strict export cannot trace the policy
    submodules inside ``torch.cond`` branches) and ``torch.onnx.export(dynamo=True)``; each cached
    region becomes an ``If`` node, checked against the number of regions. Before the export, the
    export-preparation passes (:mod:`adacache_fx.export.prepare`) rewrite a copy of the cached graph
    into ops ONNX Runtime implements; after it, the file passes ``onnx.checker``, strict shape inference
    and an ONNX Runtime session (:mod:`.validate`), or :class:`~.validate.ExportValidationError` names the
    op, the module and line it came from, and what to do. Run it with :class:`OnnxRunner`.
    """
    import onnx

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "tensorrt":
        if opset is not None and opset > TENSORRT_MAX_OPSET:
            raise ValueError(f"target='tensorrt' exports opset <= {TENSORRT_MAX_OPSET} (Attention inside If from 23), got {opset}")
        opset = TENSORRT_MAX_OPSET if opset is None else opset
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
        with stage("prepare for ONNX"):  # on a copy: the CachedModel's graph is left as it is
            prepared = prepare(program.graph_module)
        named = named_leaves(args, kwargs)
        static = program.captured.static_inputs  # baked in: their placeholders are unused
        tensors = [(name, leaf) for name, leaf in named if isinstance(leaf, torch.Tensor) and name not in static]
        device = tensors[0][1].device if tensors else torch.device("cpu")
        layout = program.layout
        flat = program.captured.flatten_inputs(args, kwargs)
        sized = layout.resolve(input_sizes(program.graph_module, flat)) if layout.symbolic else layout
        state = list(sized.allocate(num_steps, device).values())  # a fresh generation's, not the live one
        wrapper = _StatefulProgram(prepared.graph_module, [
            None if name in static else _TENSOR if isinstance(leaf, torch.Tensor) else leaf for name, leaf in named
        ])
        inputs = tuple(t for _, t in tensors) + tuple(state)
        dynamic = _dynamic_axes(program, named, static, layout)
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

    metadata = {**_metadata(cached, program, named, user_outputs, _user_shapes(exported, len(inputs))),
                "target": target, "prepared": prepared.summaries}
    with stage("save"):
        ir_model = onnx_program.model
        for value in [*ir_model.graph.inputs, *ir_model.graph.outputs]:
            if value.name in ("state.history", "state_out.history") and value.shape is not None:
                value.shape = type(value.shape)(["num_steps", *value.shape[1:]])
        ir_model.metadata_props[METADATA_KEY] = json.dumps(metadata)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx_program.save(str(path), external_data=external_data)
        profile = {}
        if target == "tensorrt":
            proto = onnx.load(str(path), load_external_data=False)
            profile = apply_tensorrt_profile(proto)
            onnx.save(proto, str(path))
    if validate is None:
        validate = target != "tensorrt"
    providers = ("CPUExecutionProvider",) if validate is True else tuple(validate or ())
    with stage("onnx.checker + shape inference + ORT session" if providers else "onnx.checker + shape inference"):
        validated = validate_file(path, providers)
        graph = onnx.load(str(path), load_external_data=False).graph
        num_if = sum(node.op_type == "If" for node in graph.node)
    if num_if != len(program.rewrite.regions):
        raise RuntimeError(
            f"the exported graph has {num_if} If nodes for {len(program.rewrite.regions)} cached regions: "
            "the exporter resolved a conditional at export time, so cached steps would not skip work"
        )
    return ExportInfo(
        path, [name for name, _ in tensors], output_names[:n_user], layout.names,
        len(program.rewrite.regions), num_if, num_steps, stage.seconds, metadata, profile, prepared.summaries,
        validated,
    )


def read_metadata(path: str | Path) -> dict:
    """The ``adacache_fx`` metadata of an ONNX file written by :func:`to_onnx`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise ValueError(f"{path} was not written by adacache_fx.export.to_onnx (no {METADATA_KEY!r} metadata)")
