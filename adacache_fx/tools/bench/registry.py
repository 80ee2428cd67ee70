"""The method registry: each method registers, under its key, a maker of its settings.

    @register("fbcache", "diffusers FirstBlockCache", full=(0.05, 0.1), quick=(0.1,))
    def _fbcache(bench, key, method, value) -> Setting | None: ...

A maker turns one value of the grid into a :class:`Setting` (``None``: skip that value).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Setting:
    """How to switch one method setting on: ``enable()`` returns ``finish()``, which switches it off and
    returns the computed steps per context (``None``: count the middle block)."""

    key: str
    method: str
    setting: str
    enable: Callable[[], Callable[[], float | None]] | None
    reason: str = ""  # set when the method cannot run at all
    hint: str = ""  # appended to an error raised while it runs
    note: str = ""  # a caveat shown in the row
    compiled: bool = False
    probe: bool = True  # count block executions with hooks (not for adacache-fx: its graph calls no module)


Maker = Callable[..., "Setting | None"]

#: Method key -> (curve name, settings of the full run, settings of --quick), in registration order.
METHODS: dict[str, tuple[str, tuple, tuple]] = {}
_MAKERS: dict[str, Maker] = {}
#: Each adacache-fx setting costs one ``torch.export`` capture (seconds): --quick keeps one per policy.
QUICK_METHODS = ("adacache-never", "adacache-fast", "adacache-static", "adacache-calibrated-warm", "adacache-magcache", "adacache-fbcache",
                 "adacache-plus", "adacache-teacache",
                 "fbcache",
                 "taylorseer", "fastercache", "dbcache")


def register(key: str, curve: str, full: tuple, quick: tuple) -> Callable[[Maker], Maker]:
    """Register ``maker(bench, key, curve, value) -> Setting | None`` for method ``key``."""

    def add(maker: Maker) -> Maker:
        if key in METHODS:
            raise ValueError(f"bench method {key!r} is registered twice")
        METHODS[key] = (curve, tuple(full), tuple(quick))
        _MAKERS[key] = maker
        return maker

    return add


def settings_of(bench, key: str) -> list[Setting]:
    """The settings of method ``key`` (full or quick grid)."""
    curve, full, quick = METHODS[key]
    made = (_MAKERS[key](bench, key, curve, value) for value in (quick if bench.quick else full))
    return [s for s in made if s is not None]
