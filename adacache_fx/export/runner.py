"""Runners for exported files: ONNX Runtime here, TensorRT in :mod:`.tensorrt`.

A runner is called like the torch model and keeps the AdaCache state between calls, per cache context,
in a :class:`~adacache_fx.state.StateStore` with the layout recorded in the file's metadata, like the
KV cache of an LLM engine.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Hashable
from pathlib import Path

import torch

from ..capture import named_leaves
from ..capture.dynamic import solve_sizes, sympy_symbols
from ..report import Report, read_report
from ..state import StateLayout, StateStore, check_num_steps, dtype_from_name, dtype_name, eval_size
from .onnx import FORMAT_VERSION, METADATA_KEY, decode_tree

_PROGRAM = "program"  # the one signature key of an exported file in the runner's state store


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
        self.layout = StateLayout.from_dict(metadata["state"])  # its shapes may be expressions of input sizes
        self._store = StateStore(check_num_steps(num_steps) if num_steps is not None else metadata["num_steps"])
        if not self.layout.symbolic:
            self._store.add_layout(_PROGRAM, self.layout, self.device)
        self._spare: dict[tuple[str, Hashable], dict[str, torch.Tensor]] = {}  # by (context, key)
        self._by_shapes: dict[tuple, tuple[Hashable, list]] = {}  # input shapes -> (state key, output shapes)

    def _execute(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run the engine: read ``feeds`` and write into the preallocated ``outputs`` (by name)."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self._store.num_steps

    @property
    def contexts(self) -> list[str]:
        """The cache contexts that ran a call."""
        return self._store.contexts

    def _key(self, context: str | None = None) -> Hashable:
        """The state key a context last ran (a file with dynamic axes has one per input size)."""
        last = self._store.last(context)
        if last is not None:
            return last[0]
        if self.layout.symbolic:
            raise RuntimeError(f"cache context {self._store.active if context is None else context!r} has not run "
                               "a call yet: this file's state shapes follow the input sizes")
        return _PROGRAM

    def state(self, context: str | None = None) -> dict[str, torch.Tensor]:
        """The current state tensors of a cache context (default: the active one), by spec name."""
        return dict(self._store.get(self._key(context), context))

    def load_state(self, state: dict[str, torch.Tensor], context: str | None = None) -> None:
        """Copy state tensors in (e.g. a :class:`~adacache_fx.CachedModel`'s ``state()``).

        Raises ValueError naming the state tensor whose shape or dtype is not the exported one."""
        unknown = sorted(set(state) - set(self.layout.names))
        if unknown:
            raise ValueError(f"unknown state tensors {unknown}; this model's state is {self.layout.names}")
        key = self._key(context)
        for name, value in state.items():
            spec = self._store.layout(key).spec(name)
            expected = (spec.shape_for(self._store.steps_for(context)), dtype_name(spec.dtype))
            if not isinstance(value, torch.Tensor) or (tuple(value.shape), dtype_name(value.dtype)) != expected:
                got = (tuple(value.shape), dtype_name(value.dtype)) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"state tensor {name!r}: expected shape {expected[0]} dtype {expected[1]}, got {got}")
        current = self._store.get(key, context)
        for name, value in state.items():
            current[name].copy_(value)

    @contextlib.contextmanager
    def cache_context(self, name: str, num_steps: int | None = None):
        """Use a separate cache state inside the block (e.g. ``"cond"`` and ``"uncond"`` of CFG, or one
        request of a server); ``num_steps``: this context's own N (the file serves every N)."""
        previous = self._store.active
        if num_steps is not None:
            if self._store.steps_for(name) != num_steps:
                self._drop_spare(name)  # sized for the old N
            self._store.set_steps(name, num_steps)
        self._store.active = name
        try:
            yield
        finally:
            self._store.active = previous

    def release(self, context: str) -> None:
        """Free a cache context's state (both of its tensor sets) and its own N."""
        self._store.release(context)
        self._drop_spare(context)

    def _drop_spare(self, context: str) -> None:
        for spare in [spare for spare in self._spare if spare[0] == context]:
            del self._spare[spare]

    def reset(self, num_steps: int | None = None) -> None:
        """Start a new generation in every context; optionally change the number of steps N."""
        if num_steps is not None and check_num_steps(num_steps) != self.num_steps:
            self._spare.clear()
        self._store.reset(num_steps)

    def report(self, context: str | None = None) -> Report | list[Report]:
        """Per-step records of the current generation, as :func:`adacache_fx.report` gives them."""
        context = self._store.active if context is None else context
        if context not in self._store.contexts:
            raise RuntimeError(f"no generation has run in cache context {context!r} yet (contexts: {self.contexts})")
        meta = self.metadata
        key = self._key(context)
        return read_report(self._store.get(key, context), self._store.layout(key), context, meta["regions"],
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
            if item["kind"] == "static":
                got = value.reshape(-1).tolist() if isinstance(value, torch.Tensor) else value
                if got != item["value"] or list(getattr(value, "shape", ())) != item["shape"]:
                    raise ValueError(
                        f"input {name!r}: this file was exported for the value {item['value']} (the model reads "
                        f"it on the host, so it is baked into the graph), got {got}; export a file for that value"
                    )
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"input {name!r}: expected a tensor, got {type(value).__name__}")
            shape = item["shape"]
            if len(value.shape) != len(shape) or any(isinstance(d, int) and d != v for d, v in zip(shape, value.shape)) \
                    or dtype_name(value.dtype) != item["dtype"]:
                fixed = "the sizes given as numbers are fixed in the file" if self.layout.symbolic \
                    else "the export is shape-specialized"
                raise ValueError(
                    f"input {name!r}: expected shape {tuple(shape)} dtype {item['dtype']}, "
                    f"got shape {tuple(value.shape)} dtype {dtype_name(value.dtype)} ({fixed})"
                )
            feeds[name] = value.to(self.device).contiguous()
        return feeds

    def _sizes(self, feeds: dict[str, torch.Tensor]) -> dict[str, int]:
        """The values of the capture's size symbols in this call (none for a file without dynamic axes)."""
        if not self.layout.symbolic:
            return {}
        shapes = {item["name"]: item.get("sizes", item["shape"]) for item in self.metadata["inputs"] if "shape" in item}
        sizes = solve_sizes((shapes[name], value.shape) for name, value in feeds.items())
        needed = {sym for spec in self.layout for d in spec.shape or () if isinstance(d, str)
                  for sym in sympy_symbols(d)}
        if not needed <= set(sizes):
            raise ValueError(f"the sizes {sorted(needed - set(sizes))} of the state are not known from the inputs "
                             f"{ {n: tuple(v.shape) for n, v in feeds.items()} }")
        return sizes

    def _state_key(self, sizes: dict[str, int]) -> Hashable:
        """The state key of a call: one per input size with dynamic axes, its layout resolved (called once
        per input shapes, see ``__call__``)."""
        if not sizes:
            return _PROGRAM
        key = (_PROGRAM, tuple(sorted(sizes.items())))
        self._store.add_layout(key, self.layout.resolve(sizes), self.device)
        return key

    def _output_shapes(self, feeds: dict[str, torch.Tensor], layout: StateLayout) -> list[list[int]]:
        """The user outputs' shapes: in the export's size symbols, known from the inputs and the state."""
        outputs = [out["shape"] for out in self.metadata["outputs"]]
        if not self.layout.symbolic:
            return outputs
        shapes = {item["name"]: item["shape"] for item in self.metadata["inputs"] if "shape" in item}
        known = [(shapes[name], value.shape) for name, value in feeds.items()]
        known += [(shape, layout.spec(name).shape) for name, shape in self.metadata["exported_state"].items()]
        sizes = solve_sizes(known)
        return [[eval_size(d, sizes) if isinstance(d, str) else d for d in shape] for shape in outputs]

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        feeds = self._user_feeds(args, kwargs)
        shapes = tuple(tuple(value.shape) for value in feeds.values())
        if shapes not in self._by_shapes:  # (the sizes are solved once per input shapes)
            key = self._state_key(self._sizes(feeds))
            self._by_shapes[shapes] = key, self._output_shapes(feeds, self._store.layout(key))
        key, output_shapes = self._by_shapes[shapes]
        layout = self._store.layout(key)
        self._store.use(key)
        current = self._store.get(key)
        following = self._spare.get((self._store.active, key))
        if following is None:  # a state never written back is shared by both sets
            fresh = layout.allocate(self._store.steps_for(), self.device)
            following = {spec.name: fresh[spec.name] if spec.returned else current[spec.name] for spec in layout}
        outputs = {
            out["name"]: torch.empty(shape, dtype=dtype_from_name(out["dtype"]), device=self.device)
            for out, shape in zip(self.metadata["outputs"], output_shapes)
        }
        for spec in layout:
            feeds[f"state.{spec.name}"] = current[spec.name]
            if spec.returned:
                outputs[f"state_out.{spec.name}"] = following[spec.name]
        self._execute(feeds, outputs)
        self._store.replace(key, following)
        self._spare[(self._store.active, key)] = current
        user = iter(outputs[out["name"]] for out in self.metadata["outputs"])
        return decode_tree(self.metadata["output_tree"], user)


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
