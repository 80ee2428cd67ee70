"""Validation of an exported file before :func:`~adacache_fx.export.to_onnx` returns it.

Three checks, each of which the file must pass: ``onnx.checker``, ONNX shape inference in strict mode
(every node of the main graph and of every ``If`` branch), and, where onnxruntime is installed, an
ONNX Runtime session created with the providers it will run on. A failure raises
:class:`ExportValidationError`, which names the ONNX op, the torch op it was translated from, the
module and the source line it came from (the exporter's node metadata ``pkg.torch.onnx.*``, carried
from the fx node's ``nn_module_stack`` and ``stack_trace``), and what to do.
"""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .profiles import walk_graphs

#: Where ONNX and ONNX Runtime name a node in an error; the last match is the innermost node.
_NODE_NAMES = (
    re.compile(r"node name: ([^)\s]+)\)"),  # onnx shape inference
    re.compile(r"Node \(([^)]+)\) Op \("),  # ONNX Runtime graph inference
    re.compile(r"node with name '([^']+)'"),  # ONNX Runtime kernel lookup
    re.compile(r"in node \(([^)]+)\)"),  # ONNX Runtime type check
    re.compile(r"Name: (\S+) OpType:"),  # onnx.checker
)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')
_OWN = ("/torch/", "/adacache_fx/", "<eval_with_key>", "/contextlib.py")


@dataclass(frozen=True)
class NodeOrigin:
    """Where an ONNX node came from, as the exporter recorded it."""

    name: str
    op_type: str
    torch_op: str | None = None  # e.g. aten.squeeze.dim
    module: str | None = None  # the module path (transformer_blocks.0), "" for the root
    module_class: str | None = None
    location: str | None = None  # file:line in function
    code: str | None = None  # the source line

    def __str__(self) -> str:
        text = f"{self.op_type} node {self.name!r}"
        if self.torch_op:
            text += f" (from {self.torch_op}"
            if self.module is not None:
                text += f" in module {self.module or '<root>'}"
                if self.module_class:
                    text += f" ({self.module_class.rpartition('.')[2]})"
            text += ")"
        if self.location:
            text += f", at {self.location}" + (f": {self.code}" if self.code else "")
        return text


class ExportValidationError(RuntimeError):
    """An exported file failed a check (``stage``); ``origin`` says which node, from which module and line."""

    def __init__(self, message: str, stage: str, origin: NodeOrigin | None = None, detail: str = ""):
        super().__init__(message)
        self.stage, self.origin, self.detail = stage, origin, detail


def node_origin(model, name: str) -> NodeOrigin | None:
    """The origin of the node called ``name`` in an ``onnx.ModelProto`` (any graph), or None."""
    for graph in walk_graphs(model.graph):
        for node in graph.node:
            if node.name == name:
                return _origin(node)
    return None


def _origin(node) -> NodeOrigin:
    props = {p.key: p.value for p in node.metadata_props}
    torch_op = module = module_class = location = code = None
    try:
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
        classes = ast.literal_eval(props.get("pkg.torch.onnx.class_hierarchy", "[]"))
    except (ValueError, SyntaxError):
        scopes, classes = [], []
    if classes:
        torch_op = classes[-1]
        # each scope is the full path of a module, outermost first; the wrapper's graph module is not the model's
        pairs = [(s, c) for s, c in zip(scopes[:-1], classes[:-1]) if s and "GraphModule" not in c]
        module = pairs[-1][0] if pairs else ""
        module_class = pairs[-1][1] if pairs else classes[0] if len(classes) > 1 else None
    frames = _FRAME.findall(props.get("pkg.torch.onnx.stack_trace", ""))
    if frames:
        user = [f for f in frames if not any(own in f[0] for own in _OWN)]
        file, line, function, code = (user or frames)[-1]
        location, code = f"{file}:{line} in {function}", code.strip() or None
    return NodeOrigin(node.name, node.op_type, torch_op, module, module_class, location, code)


def _first_error(message: str) -> str:
    """The line of the first error an ONNX or ONNX Runtime message reports (later ones often follow from it)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return next((line for line in lines if any(p.search(line) for p in _NODE_NAMES)), lines[0] if lines else "")


def failing_node(model, message: str) -> NodeOrigin | None:
    """The innermost node of the first error an ONNX or ONNX Runtime error message names, found in ``model``."""
    line = _first_error(message)
    found = sorted((m.start(), m.group(1)) for pattern in _NODE_NAMES for m in pattern.finditer(line))
    for _, name in reversed(found):
        origin = node_origin(model, name)
        if origin is not None:
            return origin
    return None


_TYPE_ERRORS = ("NOT_IMPLEMENTED", "Type Error", "is invalid", "unsupported type")


def _advice(stage: str, detail: str, origin: NodeOrigin | None, providers) -> str:
    op = origin.op_type if origin else "this op"
    if any(marker in detail for marker in _TYPE_ERRORS):
        by = f"ONNX Runtime's {', '.join(providers)}" if stage.endswith("session") else "this ONNX opset"
        return (
            f"{by} has no {op} for the input types of this node. 1. Compute it in a type that is implemented "
            f"(float32 or float16: cast around it in the model), or export the model in float32 or float16 "
            f"(bfloat16 files do not run on ONNX Runtime's CPU provider; for TensorRT export with "
            f"target='tensorrt', whose parser takes them). 2. If the op can be rewritten from the "
            f"graph, add an export-preparation pass (adacache_fx/export/prepare/). 3. If you will run the file "
            f"on another provider, validate with that one: to_onnx(..., validate=['CUDAExecutionProvider'])."
        )
    if stage == "shape inference" or "InferenceError" in detail:
        return (
            f"the ONNX translation of this torch op is not valid for its shapes ({op}). 1. Rewrite that line of "
            f"the model (a torch no-op, such as a squeeze of a dim that is not 1, is the usual cause). 2. If it "
            f"can be rewritten from the graph, add an export-preparation pass (adacache_fx/export/prepare/)."
        )
    return "report the op and the line above; to_onnx(..., validate=False) skips the ONNX Runtime check."


def _fail(stage: str, path: Path, model, error: BaseException, providers=("CPUExecutionProvider",)):
    detail = str(error).strip()
    origin = failing_node(model, detail)
    where = f" at {origin}" if origin else ""
    message = (
        f"the exported file {path} fails {stage}{where}:\n  {_first_error(detail) or type(error).__name__}"
        f"\nWhat to do: {_advice(stage, detail, origin, providers)}"
    )
    raise ExportValidationError(message, stage, origin, detail) from error


def _without_value_info(model):
    """A copy of ``model`` without the exporter's shape annotations of intermediate values: strict inference
    then checks each op against the shapes that flow from the inputs, not against annotations (the exporter's
    can disagree with ONNX's inference where ONNX Runtime runs the file, e.g. inside an attention's If branch)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for graph in walk_graphs(copy.graph):
        del graph.value_info[:]
    return copy


def validate(path: str | Path, providers=("CPUExecutionProvider",)) -> tuple[str, ...]:
    """Check an exported file: ``onnx.checker``, strict shape inference, and an ONNX Runtime session with
    ``providers`` (skipped if onnxruntime is not installed; warned and skipped if none of ``providers`` is
    available here). With no providers (a file for TensorRT, whose parser decides which dtypes an op
    takes: bfloat16 ``Conv``), shape inference checks shapes, not the ONNX schema's type constraints.
    Returns the checks done; raises :class:`ExportValidationError`."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    done = []
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        _fail("onnx.checker", path, model, error)
    done.append("onnx.checker")
    providers = list(providers or ())
    typed = bool(providers)
    try:
        onnx.shape_inference.infer_shapes(_without_value_info(model), check_type=typed, strict_mode=True,
                                          data_prop=True)
    except onnx.shape_inference.InferenceError as error:
        _fail("shape inference", path, model, error)
    done.append("shape inference" if typed else "shape inference (shapes only)")
    try:
        import onnxruntime as ort
    except ImportError:
        return tuple(done)
    available = [p for p in providers if p in ort.get_available_providers()]
    if not available:
        if providers:
            warnings.warn(f"ONNX Runtime session check skipped: none of the providers {providers} is available "
                          f"here (available: {ort.get_available_providers()})", stacklevel=3)
        return tuple(done)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), sess_options=options, providers=available)
    except Exception as error:  # onnxruntime's own exception types are not importable across versions
        _fail("an ONNX Runtime session", path, model, error, available)
    done.append(f"onnxruntime {'+'.join(available)}")
    return tuple(done)
