"""Run corpus configurations through adacache_fx and check what the transform promises.

Per configuration (:func:`run_config`, in this process; :func:`run_isolated`, in a subprocess with one
torch thread and a timeout), on a model built seeded, in eval mode and float32:

a. **never-skip**: ``transform(copy, AdaCacheConfig(num_steps=N, codebook=presets.NEVER))`` against the
   untransformed model over a few calls with varied timesteps: the max abs difference of the outputs, and
   every step computed;
b. **state**: the model handed to ``transform`` is snapshotted (:class:`adacache_fx.snapshot.ModelSnapshot`)
   before the first transformed call; what changed after it (and after the last never-skip call) is compared
   with what the untransformed model's own calls changed (a lazy cache the eager model fills is the model's
   behaviour, not the capture's); the buffers of both must be equal after the same calls;
c. **default**: ``AdaCacheConfig(num_steps=N)`` over N calls, timesteps spaced over the schedule: the
   computed steps (and, on them, the difference from the untransformed model);
d. **repeat**: after ``adacache_fx.reset`` a second generation reproduces (c)'s schedule and outputs;
e. **reset**: a reset in the middle of a third generation, then a full generation, reproduces (c) too;
f. **compile** (optional): ``torch.compile(transformed, fullgraph=True)`` over a generation: graphs,
   graph breaks, recompiles (Dynamo's counters) and the difference from (c);
g. **onnx** (optional): (c)'s transform through ``to_onnx`` and ``OnnxRunner`` (:mod:`.onnx_check`):
   exported and validated, the same computed steps, the outputs' difference from (c).

A step that raises stops the run and records the error class, its first line, the adacache_fx phase it came
from (capture / rewrite / call) and the deepest diffusers frame (file and line) it passed through.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.utils._pytree as pytree

from .configs import BY_NAME, CorpusConfig
from .inputs import materialize

#: Denoising steps of the default-policy generations (c, d, e).
NUM_STEPS = 10
#: Calls of the never-skip comparison (a).
NEVER_SKIP_CALLS = 4
#: Seconds a configuration may take in its subprocess.
TIMEOUT_S = 300.0
_RESULT_MARK = "CORPUS-RESULT "


@dataclass
class Result:
    """What one configuration did. ``status``: ``pass`` (every check held), ``fail`` (an error or a check
    that did not hold: ``stage``), ``skip`` (``error`` says why), ``timeout`` or ``crash``."""

    name: str
    cls: str
    video: bool
    source: str
    status: str = "pass"
    stage: str | None = None  # the first check that failed
    error_class: str | None = None
    error: str | None = None  # first line of the error (or what did not hold)
    phase: str | None = None  # capture / rewrite / call, for errors raised by a transformed call
    where: str | None = None  # deepest diffusers frame the error passed through: file:line (function)
    never_skip_diff: float | None = None
    tolerance: float = 0.0
    never_skip_computed: list[int] | None = None
    state_changes: list[str] | None = None  # changes the capture made that eager calls do not
    state_checked: bool = False
    eager_only_changes: list[str] | None = None  # what the eager forward changes and the transform leaves
    num_steps: int = NUM_STEPS
    computed: list[int] | None = None
    metrics: list[float | None] | None = None
    computed_diff: float | None = None  # default policy, compute steps only, against the model
    repeat_ok: bool | None = None
    reset_ok: bool | None = None
    compile_backend: str | None = None
    compile_graphs: int | None = None
    compile_breaks: int | None = None
    compile_recompiles: int | None = None
    compile_diff: float | None = None
    onnx_status: str | None = None  # pass / fail: export / fail: run / fail: mismatch (with --onnx)
    onnx_steps: list[int] | None = None
    onnx_diff: float | None = None
    onnx_error: str | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, stage: str, message: str, error: BaseException | None = None) -> Result:
        self.status, self.stage = "fail", stage
        if error is None:
            self.error_class, self.error = "Mismatch", message
        else:
            self.error_class, self.error = type(error).__name__, _first_line(error)
            self.phase, self.where = _phase(error), _diffusers_frame(error)
        return self


class _Stop(Exception):
    """A check failed; the result says which."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else "")[:400]


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _phase(error: BaseException) -> str:
    """Where in adacache_fx a transformed call's error came from."""
    names = {type(e).__name__ for e in _chain(error)}
    if "TransformError" in names or "PassError" in names:
        return "rewrite"
    if "CaptureError" in names:
        return "capture"
    files = [frame.filename for e in _chain(error) for frame in traceback.extract_tb(e.__traceback__)]
    if any("torch/export" in f or "adacache_fx/capture.py" in f for f in files):
        return "capture"
    if any("adacache_fx/passes" in f for f in files):
        return "rewrite"
    return "call"


_DIFFUSERS_LOCATION = re.compile(r"(diffusers/models/[\w/]+\.py)\"?(?:, line |:)(\d+)")


def _diffusers_frame(error: BaseException) -> str | None:
    """The deepest frame in diffusers' models the error passed through (its traceback, else a location
    the message names: torch.export quotes the user frame of a failed guard)."""
    best = None
    for e in _chain(error):
        for frame in traceback.extract_tb(e.__traceback__):
            match = _DIFFUSERS_LOCATION.search(frame.filename.replace(os.sep, "/") + f":{frame.lineno}")
            if match:
                best = f"{match.group(1).removeprefix('diffusers/')}:{frame.lineno} ({frame.name})"
        if best:
            return best
    for e in _chain(error):
        matches = _DIFFUSERS_LOCATION.findall(str(e))
        if matches:
            path, line = matches[-1]
            return f"{path.removeprefix('diffusers/')}:{line}"
    return None


def unbacked_origin(model: torch.nn.Module, config: CorpusConfig) -> str | None:
    """Where a captured graph first gets a data-dependent (unbacked) size: the diffusers line of the first
    node whose value has one, from its stack trace. Diagnoses errors that name only a symbol (``Eq(u17,
    20)``): the capture passed, a later pass met the symbol. Captures a copy of ``model`` again."""
    from adacache_fx.capture import capture

    try:
        captured = capture(copy.deepcopy(model), (), {**materialize(config.inputs), "return_dict": False})
    except Exception:  # noqa: BLE001 - a diagnosis only
        return None
    for node in captured.graph_module.graph.nodes:
        value = node.meta.get("val")
        shapes = [v.shape for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]
        symbols = {str(s) for shape in shapes for d in shape if isinstance(d, torch.SymInt)
                   for s in d.node.expr.free_symbols}
        unbacked = sorted(s for s in symbols if s.startswith("u"))
        if unbacked:
            frames = _DIFFUSERS_LOCATION.findall(node.meta.get("stack_trace") or "")
            at = f"{frames[-1][0].removeprefix('diffusers/')}:{frames[-1][1]}" if frames else "?"
            return f"{at} ({node.target}: size {', '.join(unbacked)})"
    return None


def _tensors(output) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def max_diff(a: list, b: list) -> float:
    """Max abs difference between two lists of outputs (inf where their structure differs; NaN at the same
    places counts as equal)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        xs, ys = _tensors(x), _tensors(y)
        if len(xs) != len(ys):
            return float("inf")
        for p, q in zip(xs, ys):
            if p.shape != q.shape:
                return float("inf")
            p, q = p.detach().double(), q.detach().double()
            both_nan = torch.isnan(p) & torch.isnan(q)
            d = torch.where(both_nan, torch.zeros_like(p), (p - q).abs())
            worst = max(worst, float(d.max()) if d.numel() else 0.0)
    return worst


def sigmas(num_calls: int) -> list[float]:
    """The noise levels of ``num_calls`` calls spaced over the schedule: 1, ..., 1/num_calls."""
    return [1.0 - i / num_calls for i in range(num_calls)]


def build(config: CorpusConfig) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    model = getattr(diffusers, config.cls)(**copy.deepcopy(config.init))
    return model.float().eval()


def call(model, config: CorpusConfig, sigma: float):
    with torch.no_grad():
        out = model(**materialize(config.inputs, sigma), return_dict=False)
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, out)


def _generation(cached, config: CorpusConfig, num_steps: int) -> list:
    return [call(cached, config, s) for s in sigmas(num_steps)]


def _snapshot(model):
    from adacache_fx.snapshot import ModelSnapshot

    return ModelSnapshot.take(model)


def _buffer_marks(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Identity and version counter of each buffer: what tells a buffer written or replaced since."""
    return {name: (id(b), b._version) for name, b in model.named_buffers()}


def _changed_buffers(model: torch.nn.Module, marks: dict[str, tuple[int, int]]) -> list[str]:
    now = _buffer_marks(model)
    return sorted(n for n in marks.keys() | now.keys() if marks.get(n) != now.get(n))


def _state_check(transformed, eager, marks_t, marks_e) -> tuple[list[str], list[str]]:
    """``(unexpected, eager_only)``: buffers the transformed model's calls wrote or replaced where the
    eager model's did not, or left with other values; and buffers only the eager forward changed (the
    transform left them as it found them: not a side effect of the capture)."""
    changed_t, changed_e = _changed_buffers(transformed, marks_t), _changed_buffers(eager, marks_e)
    theirs = dict(eager.named_buffers())
    unexpected = []
    for name in changed_t:
        buffer, other = dict(transformed.named_buffers()).get(name), theirs.get(name)
        if name not in changed_e:
            unexpected.append(f"buffer {name} written (the model's own forward does not write it)")
        elif buffer is None or other is None or buffer.shape != other.shape or not torch.equal(buffer, other):
            unexpected.append(f"buffer {name} written with other values than the model's own forward writes")
    eager_only = [f"buffer {name}" for name in changed_e if name not in changed_t]
    return unexpected, eager_only


def _metric(record, report) -> float | None:
    """The decision metric a step recorded (AdaCache's c): the first of the policy's columns."""
    return record.values.get(report.columns[0]) if report.columns else None


def _warnings_of(caught) -> list[str]:
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught
                   if "adacache_fx" in (w.filename or "") or "adacache" in str(w.message).lower()})


def run_config(config: CorpusConfig, num_steps: int = NUM_STEPS, never_skip_calls: int = NEVER_SKIP_CALLS,
               compile_backend: str | None = None, onnx: bool = False) -> Result:
    """Run the checks (module docstring) on one configuration, in this process."""
    import adacache_fx as ax

    result = Result(config.name, config.cls, config.video, config.source, tolerance=config.tolerance,
                    num_steps=num_steps)
    start = time.perf_counter()
    if config.skip:
        result.status, result.error = "skip", config.skip
        return result
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run_checks(ax, config, result, num_steps, never_skip_calls, compile_backend, onnx)
        result.warnings = _warnings_of(caught)
    except _Stop:
        if result.where is None and "data-dependent" in (result.error or ""):
            result.where = unbacked_origin(build(config), config)
    finally:
        result.seconds = round(time.perf_counter() - start, 2)
    return result


def _guarded(result: Result, stage: str, fn, *args):
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 - recorded, the run stops
        result.fail(stage, "", error)
        raise _Stop from error


def _run_checks(ax, config, result: Result, num_steps: int, never_skip_calls: int, backend: str | None,
                onnx: bool = False) -> None:
    pristine = _guarded(result, "build", build, config)
    # copies made before any call: each transform starts from the model as built, as a user's would
    never_model, default_model = copy.deepcopy(pristine), copy.deepcopy(pristine)
    onnx_model = copy.deepcopy(pristine) if onnx else None
    eager = pristine

    # (a) never-skip against the untransformed model, and (b) the state the capture leaves
    never = ax.transform(never_model, ax.AdaCacheConfig(num_steps=num_steps, codebook=ax.presets.NEVER))
    snap_t, snap_e = _snapshot(never_model), _snapshot(eager)
    marks_t, marks_e = _buffer_marks(never_model), _buffer_marks(eager)
    got, expected, unexpected, eager_only = [], [], [], []
    for i, sigma in enumerate(sigmas(never_skip_calls)):
        # the transformed model first: its capture sees the model as built, not one an eager call changed
        got.append(_guarded(result, "never-skip", call, never, config, sigma))
        expected.append(_guarded(result, "eager", call, eager, config, sigma))
        if snap_t is not None and i in (0, never_skip_calls - 1):
            eager_changes, changes = set(snap_e.changes()), snap_t.changes()
            unexpected += [c for c in changes if c not in eager_changes and c not in unexpected]
            eager_only += [c for c in eager_changes - set(changes) if c not in eager_only]
    result.never_skip_diff = max_diff(expected, got)
    result.never_skip_computed = ax.report(never).computed_steps
    if snap_t is not None:
        result.state_checked = True
        buffers, eager_buffers = _state_check(never_model, eager, marks_t, marks_e)
        unexpected += [c for c in buffers if c not in unexpected]
        result.state_changes = unexpected
        result.eager_only_changes = sorted(set(eager_only) | set(eager_buffers))
    if not result.never_skip_diff <= config.tolerance:
        result.fail("never-skip", f"max |diff| {result.never_skip_diff:.3g} > {config.tolerance:g}")
    elif result.never_skip_computed != list(range(1, never_skip_calls + 1)):
        result.fail("never-skip", f"computed steps {result.never_skip_computed} with the never-skip codebook")
    elif unexpected:
        result.fail("state", f"capture changed the model: {'; '.join(unexpected)[:300]}")
    del never, never_model

    # (c) the default policy over a generation
    cached = ax.transform(default_model, ax.AdaCacheConfig(num_steps=num_steps))
    first = [_guarded(result, "default", call, cached, config, s) for s in sigmas(num_steps)]
    report = ax.report(cached)
    result.computed = report.computed_steps
    result.metrics = [None if (m := _metric(r, report)) is None else round(m, 6) for r in report.steps]
    reference = [call(eager, config, s) for s in sigmas(num_steps)]
    result.computed_diff = max_diff([reference[s - 1] for s in result.computed], [first[s - 1] for s in result.computed])
    if result.status == "pass" and not result.computed_diff <= config.tolerance:
        result.fail("default", f"a computed step differs from the model by {result.computed_diff:.3g}")

    # (d) a second generation reproduces it
    ax.reset(cached)
    second = _guarded(result, "repeat", _generation, cached, config, num_steps)
    result.repeat_ok = ax.report(cached).computed_steps == result.computed and max_diff(first, second) == 0.0

    # (e) a reset in the middle of a third generation, then a full one
    ax.reset(cached)
    for s in sigmas(num_steps)[: num_steps // 2]:
        _guarded(result, "reset", call, cached, config, s)
    ax.reset(cached)
    third = _guarded(result, "reset", _generation, cached, config, num_steps)
    result.reset_ok = ax.report(cached).computed_steps == result.computed and max_diff(first, third) == 0.0
    if result.status == "pass" and not result.repeat_ok:
        result.fail("repeat", "a second generation did not reproduce the schedule and outputs")
    elif result.status == "pass" and not result.reset_ok:
        result.fail("reset", "a generation after a reset in the middle did not reproduce the first")

    # (f) torch.compile of the transformed model
    if backend:
        result.compile_backend = backend
        _guarded(result, "compile", _compile_check, ax, cached, config, num_steps, backend, first, result)

    # (g) ONNX export and ONNX Runtime (recorded beside the status, which it does not change)
    if onnx:
        from .onnx_check import onnx_check

        found = onnx_check(ax, onnx_model, config, num_steps, first, result.computed, sigmas(num_steps), call,
                           max_diff)
        for key, value in found.items():
            setattr(result, key, value)


def _compile_check(ax, cached, config, num_steps, backend, first, result: Result) -> None:
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(cached, backend=counter, fullgraph=True)
    ax.reset(cached)
    outputs = _generation(compiled, config, num_steps)
    result.compile_graphs = counter.frame_count
    result.compile_breaks = sum(counters["graph_break"].values())
    result.compile_recompiles = sum(counters["recompiles"].values())
    result.compile_diff = max_diff(first, outputs)
    same_schedule = ax.report(cached).computed_steps == result.computed
    if result.status == "pass" and (result.compile_breaks or result.compile_graphs != 1 or not same_schedule
                                    or result.compile_diff > 1e-5):
        result.fail("compile", f"{result.compile_graphs} graphs, {result.compile_breaks} breaks, "
                               f"diff {result.compile_diff:.3g}, same schedule {same_schedule}")


def run_isolated(name: str, timeout: float = TIMEOUT_S, compile_backend: str | None = None,
                 num_steps: int = NUM_STEPS, never_skip_calls: int = NEVER_SKIP_CALLS, onnx: bool = False) -> Result:
    """:func:`run_config` in a fresh Python process with one torch thread (a model's global caches and
    Dynamo's state stay out of the next configuration); ``timeout`` seconds at most."""
    config = BY_NAME[name]
    command = [sys.executable, "-m", "adacache_fx.tools.corpus.runner", name, "--steps", str(num_steps),
               "--never-skip-calls", str(never_skip_calls)]
    if compile_backend:
        command += ["--compile", compile_backend]
    if onnx:
        command.append("--onnx")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return Result(name, config.cls, config.video, config.source, status="timeout", stage="timeout",
                      error=f"no result within {timeout:g} s", seconds=round(time.perf_counter() - start, 2))
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return Result(**json.loads(line[len(_RESULT_MARK):]))
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return Result(name, config.cls, config.video, config.source, status="crash", stage="crash",
                  error_class=f"exit {done.returncode}", error=tail[:400],
                  seconds=round(time.perf_counter() - start, 2))


def main(argv: list[str] | None = None) -> int:
    """``python -m adacache_fx.tools.corpus.runner NAME``: one configuration, its result as a JSON line."""
    parser = argparse.ArgumentParser(description="run one corpus configuration (used by `adacache-fx corpus`)")
    parser.add_argument("name", choices=sorted(BY_NAME))
    parser.add_argument("--steps", type=int, default=NUM_STEPS)
    parser.add_argument("--never-skip-calls", type=int, default=NEVER_SKIP_CALLS)
    parser.add_argument("--compile", default=None, metavar="BACKEND")
    parser.add_argument("--onnx", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run_config(BY_NAME[args.name], args.steps, args.never_skip_calls, args.compile, args.onnx)
    print(_RESULT_MARK + json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
