"""One row of the bench table: a method at one setting, aggregated over captions and seeds."""

from __future__ import annotations

from dataclasses import dataclass, fields

#: The uncached row every metric is relative to.
BASELINE = "no caching"
#: The uncached transformer under ``torch.compile``: the compiled rows' speedups are relative to it.
COMPILED_BASELINE = f"{BASELINE} compiled"


@dataclass
class Row:
    """One table row: a method at one setting, aggregated over captions and seeds (see the module doc)."""

    method: str
    setting: str
    steps: int
    computed: float | None = None
    speedup: float | None = None
    time_s: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    check_ok: float | None = None
    cache_mib: float | None = None
    graph_breaks: int | None = None
    note: str = ""
    compiled: bool = False  # the transformer ran under torch.compile (inductor); speedup vs it compiled uncached


COLUMNS = tuple(f.name for f in fields(Row))
