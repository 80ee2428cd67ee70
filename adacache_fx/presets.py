"""Codebooks of the official AdaCache implementation (Open-Sora), as ``{threshold: rate}``.

A codebook maps the rate of change ``c`` of a residual to the number of steps the cache is reused:
the rate of the first threshold with ``c < threshold``, else the last rate.
"""

from types import MappingProxyType

#: 30 steps, fast: aggressive reuse.
FAST_30 = MappingProxyType({0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1})
#: 30 steps, slow: conservative reuse.
SLOW_30 = MappingProxyType({0.08: 3, 0.16: 2, 0.24: 1, 0.32: 1, 0.40: 1, 1.00: 1})
#: 100 steps.
FAST_100 = MappingProxyType({0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.00: 3})
#: Never reuse: every step computes (rate 1 whatever c is). Useful to check a transform is exact.
NEVER = MappingProxyType({float("inf"): 1})

#: MoReg step windows of the official implementation, by number of steps.
MOREG_WINDOW_30 = (4, 26)
MOREG_WINDOW_100 = (10, 90)

PRESETS = {"fast": FAST_30, "slow": SLOW_30, "fast_100": FAST_100, "never": NEVER}
