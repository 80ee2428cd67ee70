"""Named layouts of a region's ``torch.cond``: which operand or output is which.

``torch.cond`` takes and returns flat tuples. Both branches of a region are built, and the outputs read,
through one :class:`BranchLayout`, so no code counts positions by hand::

    operands: inputs | caches | previous_caches | older_caches | weight | fit_weight | site_memory | row_mask
    outputs:  streams | values | residuals | value_caches | previous_caches | older_caches | site_memory
              | metric_parts | gain_parts

* ``inputs``: the region's live-ins; ``caches``: one per stream (its residual) and per value (the value);
* ``previous_caches`` / ``weight``: the caches of the compute step before, and the forecast weights
  (``w`` with a linear forecast, ``(u, v)`` with a quadratic one); ``older_caches``: the caches of the
  compute step before that (quadratic forecast only);
* ``streams`` / ``values``: the region's outputs; ``residuals``: ``out - inp`` of each stream;
* ``value_caches``: the computed values kept apart from the (extrapolated) outputs, with a forecast;
* ``site_memory``: the metric residual of each metric site in the region (the next ``p_prev``);
* ``row_mask`` (per-sample decisions only): the ``[B]`` bools of the rows that compute this step;
* ``metric_parts``: each site's 1-D metric parts from the policy (zeros on a cached step);
* ``fit_weight`` / ``gain_parts`` (``forecast_gain="fit"`` only): the forecast weights before the gain,
  and the two sums the gain is fitted from (``[<r - c, f - c>, ||f - c||^2]``; zeros on a cached step).
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
    def for_region(cls, num_inputs: int, num_streams: int, num_values: int, num_sites: int, order: int,
                   fit_gain: bool = False, per_sample: bool = False):
        """``order``: the forecast order (0 reuse, 1 linear, 2 quadratic; a bool reads as 0 or 1);
        ``fit_gain``: the forecast gain is fitted online (``forecast_gain="fit"``); ``per_sample``: the
        branches take the rows' decisions (``row_mask``, per-sample decisions)."""
        order = int(order)
        fit = order >= 1 and fit_gain
        caches = num_streams + num_values
        kept = caches if order >= 1 else 0
        older = caches if order >= 2 else 0
        operands = Groups((("inputs", num_inputs), ("caches", caches), ("previous_caches", kept),
                           ("older_caches", older), ("weight", order), ("fit_weight", order if fit else 0),
                           ("site_memory", num_sites), ("row_mask", 1 if per_sample else 0)))
        outputs = Groups((("streams", num_streams), ("values", num_values), ("residuals", num_streams),
                          ("value_caches", num_values if order else 0), ("previous_caches", kept),
                          ("older_caches", older), ("site_memory", num_sites), ("metric_parts", num_sites),
                          ("gain_parts", 1 if fit else 0)))
        return cls(operands, outputs)

    @property
    def order(self) -> int:
        """The forecast order: the number of forecast weights the cached branch takes."""
        return self.operands.size("weight")

    @property
    def fit_gain(self) -> bool:
        """Whether the compute branch measures the sums the forecast gain is fitted from."""
        return self.outputs.size("gain_parts") == 1

    @property
    def forecast(self) -> bool:
        """Whether the cached branch forecasts (takes the previous caches and weights)."""
        return self.order >= 1

    def shaped_like(self) -> list[int | None]:
        """For each output, the operand of the same shape (None: the metric and gain parts). A stream has
        its residual's shape, the caches', and a value its own cache's."""
        ops = self.operands.unpack(range(len(self.operands)))
        streams = self.outputs.size("streams")
        caches, values = ops["caches"][:streams], ops["caches"][streams:]
        return self.outputs.pack(
            streams=caches, values=values, residuals=caches, value_caches=values if self.order else [],
            previous_caches=ops["caches"] if self.forecast else [], older_caches=ops["previous_caches"],
            site_memory=ops["site_memory"], metric_parts=[None] * self.outputs.size("metric_parts"),
            gain_parts=[None] * self.outputs.size("gain_parts"))
