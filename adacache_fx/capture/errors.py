"""What a failed capture raises and says: the model, the op, the input and the line, and what to do."""

from __future__ import annotations

import contextlib
import re
import sys
import traceback

import torch


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


def data_dependent_errors() -> tuple[type[BaseException], ...]:
    """What ``torch.export`` raises when Python code needs a value the trace does not have (imported on
    first use: ``symbolic_shapes`` loads sympy, which ``import adacache_fx`` should not)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, PendingUnbackedSymbolNotFound

    return (GuardOnDataDependentSymNode, PendingUnbackedSymbolNotFound, DataDependentOutputException,
            DynamicOutputShapeException)


_SYMBOLIC_NAMES = re.compile(r"\b(SymInt|SymFloat|SymBool|symbolic|data-dependent|unbacked)\b")


def is_data_dependent(error: BaseException | None) -> bool:
    """The error, or one it was raised from, says the trace lacked a value: a data-dependent guard, or
    Python code handed a symbolic value where it needs a real one (``set()`` of SymInts, ``int()``)."""
    errors = data_dependent_errors()
    while error is not None:
        if isinstance(error, errors) or (isinstance(error, (TypeError, ValueError, RuntimeError))
                                         and _SYMBOLIC_NAMES.search(str(error))):
            return True
        error = error.__cause__ or error.__context__
    return False


def brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def user_line(error: BaseException) -> str | None:
    """The model's source line the error came from (``file:line in function``): the last frame of its
    traceback outside torch and adacache_fx, or the line torch names (``Caused by: (...)``)."""
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ is not None else []
    own = [f for f in frames if "/torch/" not in f.filename and "/adacache_fx/" not in f.filename
           and "/contextlib.py" not in f.filename]
    if own:
        frame = own[-1]
        return f"{frame.filename}:{frame.lineno} in {frame.name}"
    found = re.search(r"Caused by: \(([^)]*)\)", str(error))
    return found.group(1) if found else None


def failing_op(error: BaseException) -> str | None:
    text = str(error)
    for marker in ("aten.", "torch.ops."):
        at = text.find(marker)
        if at >= 0:
            return text[at:].split()[0].rstrip(",.:)")
    return None


def capture_message(name: str, error: BaseException, tried: str | None = None) -> str:
    op, line = failing_op(error), user_line(error)
    return (
        f"adacache_fx could not capture {name} with torch.export(strict=False){f' at {op}' if op else ''}"
        f"{f' ({line})' if line else ''}: {brief(error)}\n"
        + (f"Tried: {tried}.\n" if tried else "")
        + "What you can do: make the forward traceable by torch.export (see the error above; data-dependent "
        "Python control flow is the usual cause), name the inputs it reads on the host in "
        "AdaCacheConfig(static_inputs=...), or transform the submodule that holds the transformer blocks "
        "instead of the whole model."
    )


def untraced_message(model: torch.nn.Module, fakes: list[str]) -> str:
    sites = []
    for const in fakes:
        path = const.rpartition(".")[0]
        module = model.get_submodule(path)
        buffers = [n for n, _ in module.named_buffers(recurse=False)]
        sites.append(f"{const} in module {path or '(root)'} ({type(module).__name__}, buffers {buffers})")
    return (
        f"adacache_fx could not capture {type(model).__name__}: its forward computes tensors that torch.export "
        f"cannot trace, even with input-independent tensors evaluated eagerly: {'; '.join(sites)} (e.g. a "
        "buffer rebuilt through .data for an input size other than the configured one). What you can do: call "
        "the model at the size its config was built for, or compute that tensor outside the forward."
    )


class _DropPartialGraphs:
    """``sys.stderr`` without the partial graph ``torch.export`` prints before raising: an attempt that
    fails is expected here (the retries), and the error that matters is raised with context."""

    def __init__(self, stream):
        self.stream, self.dropped = stream, False

    def write(self, text):
        dropped, self.dropped = self.dropped, text.lstrip().startswith("def forward(")
        if self.dropped or (dropped and not text.strip()):  # the graph, and the line end print adds
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def without_partial_graphs():
    stream = sys.stderr
    sys.stderr = _DropPartialGraphs(stream)
    try:
        yield
    finally:
        sys.stderr = stream
