"""The interface between the graph rewrite and a caching decision rule.

A policy is tensor code that runs inside the rewritten graph, in three places:

* :meth:`Policy.decide`, at the top of the graph: advance the step and return the 0-dim bool
  ``compute`` that every region's ``torch.cond`` takes;
* :meth:`Policy.measure`, inside each compute branch that holds a metric site: reduce the site's
  residual ``p`` and the one kept from the last compute step to a 1-D float32 vector of *metric parts*
  (sums, not ratios: parts from shards of a sequence add up, so a distributed run can all-reduce them);
* :meth:`Policy.update`, at the bottom: turn the parts into the next schedule and the step's history row.

A policy that decides from a signal of the *current* step (FirstBlockCache, TeaCache) sets
:attr:`Policy.early_signal` to where that signal is read (``"first_block"``: the residual ``out - inp``
of the first block's latent stream). The rewrite then leaves the first block outside every cached region
(it runs on every step), makes the signal metric site 0, calls :meth:`Policy.measure` on it in the main
graph right after the first block (``p_prev`` is the signal kept from an earlier step, see
:attr:`Policy.remember_signal`), and passes the parts to :meth:`Policy.decide` as ``signal`` (a list, one
vector per signal site); :meth:`Policy.update` receives them again in ``parts``. A policy without an early
signal is called as before (``decide`` without ``signal``).

A policy keeps its own scalar state (declared by :meth:`Policy.state_specs`); the rewrite threads it
through the graph as explicit state, so torch.compile and ONNX export need nothing policy-specific. A
new policy is one module implementing this class plus one ``register_policy`` line (see
``policies/__init__.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..state import DEFAULT_REPORT_COLUMNS, StateSpec


def advance_step(step: torch.Tensor, num_steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, fresh)``: the 1-based step this call runs, and whether it starts a new generation (no step
    done yet, ``step`` 0 after a reset, or the last one finished, ``step >= num_steps``)."""
    fresh = (step == 0) | (step >= num_steps)
    return torch.where(fresh, torch.ones_like(step), step + 1), fresh


class Policy(nn.Module):
    """Base class of decision rules. ``state`` dicts map the names of :meth:`state_specs` to tensors."""

    #: Where the early signal of the current step is read before :meth:`decide`, or None (decide from
    #: earlier steps only). ``"first_block"``: the residual of the first block, which then runs uncached.
    early_signal: str | None = None
    #: When the kept signal ``p_prev`` is replaced by this step's: ``"compute"`` (on compute steps only,
    #: as FirstBlockCache) or ``"every"`` step (as TeaCache).
    remember_signal: str = "compute"
    #: Whether :meth:`decide` / :meth:`update` read the metric residual. False (MagCache, whose rule
    #: reads calibrated ratios only): the rewrite plans no metric site, so nothing is measured or kept.
    uses_metric: bool = True
    #: Names of history columns 1-3 (column 0 is ``computed``) as :class:`~adacache_fx.state.Report`
    #: prints them; None for a column the policy leaves constant.
    history_columns: tuple[str | None, str | None, str | None] = DEFAULT_REPORT_COLUMNS

    def state_specs(self) -> tuple[StateSpec, ...]:
        """The scalar state this policy keeps between steps (besides ``step``, ``num_steps``, ``history``)."""
        raise NotImplementedError

    def num_parts(self, site: int) -> int:
        """Length of the metric-parts vector :meth:`measure` returns for metric site ``site``."""
        raise NotImplementedError

    def decide(self, step: torch.Tensor, num_steps: torch.Tensor, state: dict, signal: list | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(s, compute, state)``: the 1-based step being run, whether it computes, the updated state.
        ``step`` is the last step done (0 after a reset; a step >= N means a new generation starts).
        ``signal``: with an :attr:`early_signal`, this step's metric parts of the signal sites (their
        ``p_prev`` is stale on the first step of a generation); otherwise not passed."""
        raise NotImplementedError

    def measure(self, site: int, p: torch.Tensor, p_prev: torch.Tensor) -> torch.Tensor:
        """Metric parts (1-D float32) of site ``site`` on a compute step: ``p`` now, ``p_prev`` at the last compute step."""
        raise NotImplementedError

    def update(self, s, compute, parts: list[torch.Tensor], state: dict, history: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """``(state, history)`` after step ``s``: ``parts`` has one vector per site (zeros on cached steps)."""
        raise NotImplementedError


class PolicyCall(nn.Module):
    """A graph node's handle on one method of a policy (fx ``call_module`` calls ``forward``)."""

    def __init__(self, policy: Policy, method: str):
        super().__init__()
        self.policy, self.method = policy, method

    def forward(self, *args):
        return getattr(self.policy, self.method)(*args)
