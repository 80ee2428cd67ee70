"""adacache-fx: AdaCache (adaptive caching for video diffusion transformers) as a torch.fx pass.

    model = adacache_fx.transform(model, adacache_fx.AdaCacheConfig(num_steps=30))
    model = torch.compile(model, fullgraph=True)
"""

from . import presets
from .api import Report, StepRecord, report, reset, transform
from .backends import compile
from .calibrate import calibrate
from .capture import CaptureError
from .config import AdaCacheConfig, MoRegConfig
from .module import CachedModel, TransformError
from .pipeline import disable, enable

__version__ = "0.1.0"

__all__ = [
    "AdaCacheConfig",
    "CachedModel",
    "CaptureError",
    "MoRegConfig",
    "Report",
    "StepRecord",
    "TransformError",
    "calibrate",
    "compile",
    "disable",
    "enable",
    "presets",
    "report",
    "reset",
    "transform",
]
