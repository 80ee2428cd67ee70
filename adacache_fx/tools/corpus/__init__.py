"""``adacache-fx corpus``: the tiny configurations of diffusers' own transformer tests, run through
``adacache_fx.transform`` (never-skip exactness, the state the capture leaves, the default schedule,
repeat and reset, optionally torch.compile), one subprocess per configuration.

:mod:`.configs` holds the configurations as data, :mod:`.inputs` the input specs, :mod:`.runner` the checks
and :mod:`.cli` the command. Needs diffusers (the ``tools`` extra).
"""

from .configs import BY_NAME, CONFIGS, CorpusConfig, select
from .runner import Result, run_config, run_isolated

__all__ = ["BY_NAME", "CONFIGS", "CorpusConfig", "Result", "run_config", "run_isolated", "select"]
