"""adacache-fx: AdaCache (adaptive caching for video diffusion transformers) as a torch.fx pass.

    model = adacache_fx.transform(model, adacache_fx.AdaCacheConfig(num_steps=30))
    model = torch.compile(model, fullgraph=True)

The core imports torch only. ``adacache_fx.enable`` / ``disable`` (diffusers pipelines) load their
module on first use; ``adacache_fx.export`` (ONNX, TensorRT) and ``adacache_fx.tools`` (demo, bench,
reference model, CLI) are separate subpackages.
"""

from . import policies as _policies
from . import presets
from .api import Report, StepRecord, release, report, reset, transform
from .backends import compile
from .calibrate import calibrate, calibrate_magnitudes, calibrate_plus, calibrate_teacache
from .capture import CaptureError
from .check import CheckReport, check
from .config import CacheConfig
from .module import CachedModel, TransformError

globals().update({name: getattr(_policies, name) for name in _policies.CONFIGS})  # every registered policy's config

__version__ = "0.2.0"

_LAZY = {"enable": "integrations.diffusers", "disable": "integrations.diffusers"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = globals()[name] = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_policies.CONFIGS,
    "CacheConfig",
    "CachedModel",
    "CaptureError",
    "CheckReport",
    "Report",
    "StepRecord",
    "TransformError",
    "calibrate",
    "calibrate_magnitudes",
    "calibrate_plus",
    "calibrate_teacache",
    "check",
    "compile",
    "disable",
    "enable",
    "presets",
    "release",
    "report",
    "reset",
    "transform",
]
