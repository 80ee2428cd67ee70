"""Named layouts of a region's ``torch.cond``: which operand or output is which.

``torch.cond`` takes and returns flat tuples. Both branches of a region are built, and the outputs read,
through one :class:`BranchLayout`, so no code counts positions by hand::

    operands: inputs | caches | previous_caches | older_caches | weight | site_memory
    outputs:  streams | values | residuals | value_caches | previous_caches | older_caches | site_memory
              | metric_parts

* ``inputs``: the region's live-ins; ``caches``: one per stream (its residual) and per value (the value);
* ``previous_caches`` / ``weight``: the caches of the compute step before, and the forecast weights
  (``w`` with a linear forecast, ``(u, v)`` with a quadratic one); ``older_caches``: the caches of the
  compute step before that (quadratic forecast only);
* ``streams`` / ``values``: the region's outputs; ``residuals``: ``out - inp`` of each stream;
* ``value_caches``: the computed values kept apart from the (extrapolated) outputs, with a forecast;
* ``site_memory``: the metric residual of each metric site in the region (the next ``p_prev``);
* ``metric_parts``: each site's 1-D metric parts from the policy (zeros on a cached step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Groups:
    """A flat sequence cut into named groups of fixed sizes, in order."""

    sizes: tuple[tuple[str, int], ...]

    def __len__(self) -> int:
        return sum(size for _, size in self.sizes)

    def size(self, name: str) -> int:
        return dict(self.sizes)[name]

    def pack(self, **groups: Sequence) -> list:
        """Concatenate the groups in order; every group must be given with its size."""
        if set(groups) != {name for name, _ in self.sizes}:
            raise ValueError(f"groups {sorted(groups)} != {[name for name, _ in self.sizes]}")
        flat = []
        for name, size in self.sizes:
            if len(groups[name]) != size:
                raise ValueError(f"group {name!r} has {len(groups[name])} items, the layout {size}")
            flat.extend(groups[name])
        return flat

    def unpack(self, items: Sequence) -> dict[str, list]:
        """The named groups of a flat sequence of this layout."""
        if len(items) != len(self):
            raise ValueError(f"{len(items)} items for a layout of {len(self)}")
        groups, start = {}, 0
        for name, size in self.sizes:
            groups[name] = list(items[start : start + size])
            start += size
        return groups


@dataclass(frozen=True)
class BranchLayout:
    """The operands and outputs of one region's ``torch.cond``."""

    operands: Groups
    outputs: Groups

    @classmethod
    def for_region(cls, num_inputs: int, num_streams: int, num_values: int, num_sites: int, order: int):
        """``order``: the forecast order (0 reuse, 1 linear, 2 quadratic; a bool reads as 0 or 1)."""
        order = int(order)
        caches = num_streams + num_values
        kept = caches if order >= 1 else 0
        older = caches if order >= 2 else 0
        operands = Groups((("inputs", num_inputs), ("caches", caches), ("previous_caches", kept),
                           ("older_caches", older), ("weight", order), ("site_memory", num_sites)))
        outputs = Groups((("streams", num_streams), ("values", num_values), ("residuals", num_streams),
                          ("value_caches", num_values if order else 0), ("previous_caches", kept),
                          ("older_caches", older), ("site_memory", num_sites), ("metric_parts", num_sites)))
        return cls(operands, outputs)

    @property
    def order(self) -> int:
        """The forecast order: the number of forecast weights the cached branch takes."""
        return self.operands.size("weight")

    @property
    def forecast(self) -> bool:
        """Whether the cached branch forecasts (takes the previous caches and weights)."""
        return self.order >= 1
