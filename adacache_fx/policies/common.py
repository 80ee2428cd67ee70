"""Tensor code several policies share. Everything here is elementwise over the state (0-dim in the
graph, ``[runs]`` in a replay); metric parts keep their parts in the last dimension."""

from __future__ import annotations

import torch
from torch import nn

#: The largest N whose retention window is tabulated (exactly as Python computes it on the host).
TABULATED = 1024


def advance_step(step: torch.Tensor, num_steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, fresh)``: the 1-based step this call runs, and whether it starts a new generation (no step
    done yet, ``step`` 0 after a reset, or the last one finished, ``step >= num_steps``)."""
    fresh = (step == 0) | (step >= num_steps)
    return torch.where(fresh, torch.ones_like(step), step + 1), fresh


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` elementwise, for a 0-dim or batched int64 ``index`` (``index_select``, which
    torch.export and ONNX take without reading the index on the host)."""
    return table.index_select(0, index.reshape(-1)).reshape(index.shape)


def distance_parts(p: torch.Tensor, p_prev: torch.Tensor) -> torch.Tensor:
    """Parts ``(||p - p_prev||_1, ||p_prev||_1)`` of the relative L1 distance, in float32."""
    p, p_prev = p.float(), p_prev.float()
    return torch.stack([(p - p_prev).abs().sum(), p_prev.abs().sum()])


def relative(parts: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` of a pair of parts (the last dimension), guarded against a zero
    denominator."""
    return parts[..., 0] / parts[..., 1].clamp_min(1e-12)


def mean_distance(parts: list[torch.Tensor]) -> torch.Tensor:
    """The relative distance of the first two parts of each site, averaged over the sites."""
    distances = [relative(part[..., :2]) for part in parts]
    return distances[0] if len(distances) == 1 else torch.stack(distances).mean(0)


def nan_where_not(mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` where ``mask``, NaN elsewhere (a history column with nothing measured)."""
    return torch.where(mask, value, torch.full_like(value, float("nan")))


class RetentionWindow(nn.Module):
    """``max(minimum, int(ratio * N + 0.5))`` for an int64 ``N``: exact from a table up to
    :data:`TABULATED` (Python's float arithmetic, as diffusers rounds), float32 beyond it."""

    def __init__(self, ratio: float, minimum: int = 0):
        super().__init__()
        self.ratio, self.minimum = ratio, minimum
        table = [max(minimum, int(ratio * n + 0.5)) for n in range(TABULATED + 1)]
        self.register_buffer("table", torch.tensor(table, dtype=torch.int64), persistent=False)

    def forward(self, num_steps: torch.Tensor) -> torch.Tensor:
        beyond = (num_steps.to(torch.float32) * self.ratio + 0.5).floor().to(torch.int64).clamp_min(self.minimum)
        return torch.where(num_steps > TABULATED, beyond, lookup(self.table, num_steps.clamp(0, TABULATED)))
