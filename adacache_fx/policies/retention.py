"""The retention window of a policy: how many first steps always compute, for the N of the generation."""

from __future__ import annotations

import torch
from torch import nn

#: The largest N whose window is tabulated (exactly as Python computes it on the host).
TABULATED = 1024


class RetentionWindow(nn.Module):
    """``max(minimum, int(ratio * N + 0.5))`` for a 0-dim int64 ``N``: exact from a table up to
    :data:`TABULATED` (Python's float arithmetic, as diffusers rounds), float32 beyond it."""

    def __init__(self, ratio: float, minimum: int = 0):
        super().__init__()
        self.ratio, self.minimum = ratio, minimum
        table = [max(minimum, int(ratio * n + 0.5)) for n in range(TABULATED + 1)]
        self.register_buffer("table", torch.tensor(table, dtype=torch.int64), persistent=False)

    def forward(self, num_steps: torch.Tensor) -> torch.Tensor:
        beyond = (num_steps.to(torch.float32) * self.ratio + 0.5).floor().to(torch.int64).clamp_min(self.minimum)
        tabulated = self.table.index_select(0, num_steps.clamp(0, TABULATED).reshape(1)).reshape(())
        return torch.where(num_steps > TABULATED, beyond, tabulated)
