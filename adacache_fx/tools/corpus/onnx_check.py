"""(g) of the corpus checks, with ``--onnx``: the default-policy transform through ``to_onnx`` and
``OnnxRunner`` over a generation, against the torch run of (c).

Records whether the file was written (``to_onnx`` validates it: checker, shape inference, an ONNX Runtime
session), whether the runner computed the same steps, the outputs' max difference and, on a failure, the
error's first line (``ExportValidationError`` names the ONNX op, the torch op and the module line).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .inputs import materialize


def onnx_check(ax, model, config, num_steps: int, expected: list, computed: list[int], sigmas, call, max_diff) -> dict:
    """``{"onnx_status", "onnx_steps", "onnx_diff", "onnx_error"}`` for ``model`` (untransformed, as built)."""
    from adacache_fx.export import OnnxRunner, to_onnx

    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=num_steps))
    found = {"onnx_status": "fail: export", "onnx_steps": None, "onnx_diff": None, "onnx_error": None}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{config.name}.onnx"
        try:
            to_onnx(cached, (), path, kwargs=dict(materialize(config.inputs, sigmas[0]), return_dict=False))
        except Exception as error:  # noqa: BLE001 - recorded in the table
            found["onnx_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            return found
        found["onnx_status"] = "fail: run"
        try:
            runner = OnnxRunner(path, num_steps=num_steps)
            outputs = [call(runner, config, s) for s in sigmas]
        except Exception as error:  # noqa: BLE001
            found["onnx_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            return found
    found["onnx_steps"] = runner.report().computed_steps
    found["onnx_diff"] = max_diff(expected, outputs)
    same = found["onnx_steps"] == computed
    found["onnx_status"] = "pass" if same and found["onnx_diff"] <= 1e-4 else "fail: mismatch"
    return found
