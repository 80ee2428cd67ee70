"""The interface between the graph rewrite and a caching decision rule.

A policy is tensor code that runs inside the rewritten graph, in three places:

* :meth:`Policy.decide`, at the top of the graph: advance the step and return the bool ``compute`` that
  every region's ``torch.cond`` takes;
* :meth:`Policy.measure`, inside each compute branch that holds a metric site: reduce the site's
  residual ``p`` and the one kept from the last compute step to float32 *metric parts*, the last
  dimension (sums, not ratios: parts from shards of a sequence add up, so a distributed run can
  all-reduce them);
* :meth:`Policy.update`, at the bottom: turn the parts into the next schedule, and name what the step's
  history row records (``{column: value}``, the columns of :attr:`Policy.history_columns`; the rewrite
  writes the row).

What a policy needs from the graph it declares in :meth:`Policy.needs` (a :class:`Needs`): a metric
residual, an early signal of the current step, the frame layout of the metric residual. The rewrite
plans exactly that and builds the policy once with what it found (:class:`GraphFacts`).

The state is explicit (:meth:`Policy.state_specs`), and the code is elementwise over it: the same
policy decides one generation (0-dim state) in the graph, or many recorded runs at once (state of
shape ``[runs]``) in :func:`~adacache_fx.policies.replay.replay`, which calibration uses. A new policy
is one module: a config (a :class:`~adacache_fx.CacheConfig` subclass), a subclass of this class, and
``@register_policy(TheConfig)`` on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..parallel import SequenceShard
from ..state import StateSpec


@dataclass(frozen=True)
class FrameNeeds:
    """A rule that reads the motion of the metric residual needs its ``(batch, frames)`` layout:
    ``count`` forces the number of latent frames (None: inferred from the patch embedding), the largest
    frame stride must stay below it, and errors name ``setting`` (where the user sets ``count``)."""

    count: int | None = None
    max_stride: int = 1
    setting: str = "MoRegConfig(frames=T)"


@dataclass(frozen=True)
class Needs:
    """What a policy reads from the graph (its metric sites, in this order: the early signal's, then the
    metric residuals').

    ``metric``: a metric residual inside the cached regions (``metric_block`` / ``metric_branch``),
    measured on compute steps; ``early_signal``: where a signal of the *current* step is read before
    :meth:`Policy.decide`
    (``"first_block"``: the first block's residual, that block then runs uncached; ``"modulated_input"``:
    the input of the first block's first linear layer on its stream), with ``remember_signal`` saying
    when the kept signal is replaced (``"compute"`` steps only, or ``"every"`` step); ``frames``: the
    ``(batch, frames)`` layout of the metric residual (:class:`FrameNeeds`; None: not needed)."""

    metric: bool = True
    early_signal: str | None = None
    remember_signal: str = "compute"
    frames: FrameNeeds | None = None


@dataclass(frozen=True)
class GraphFacts:
    """What the rewrite found for a policy: ``num_sites`` metric sites, the ``frame_layout`` ``(batch,
    frames)`` of site 0 (when :attr:`Needs.frames`), and under context parallelism the ``shard`` of the
    sequence that site holds (:class:`~adacache_fx.parallel.SequenceShard`)."""

    num_sites: int = 1
    frame_layout: tuple[int, int] | None = None
    shard: SequenceShard | None = None


class Policy(nn.Module):
    """Base class of decision rules. ``state`` dicts map the names of :meth:`state_specs` to tensors."""

    #: Names of the history columns after ``computed``, as reports print them.
    history_columns: tuple[str, ...] = ()
    #: the column every compute step after the first measures: a non-finite value there is reported
    #: (``StepRecord.nonfinite``); None when the policy records NaN there by design
    checked_column: str | None = None

    def __init__(self, config, facts: GraphFacts | None = None):
        super().__init__()
        self.config = config
        self.facts = facts or GraphFacts()

    @classmethod
    def needs(cls, config) -> Needs:
        """What the rule reads from the graph for ``config`` (default: a metric residual)."""
        return Needs()

    def state_specs(self) -> tuple[StateSpec, ...]:
        """The state this policy keeps between steps (besides ``step``, ``num_steps``, ``history``)."""
        raise NotImplementedError

    def num_parts(self, site: int) -> int:
        """Length of the metric-parts vector :meth:`measure` returns for metric site ``site``."""
        return 2

    def decide(self, step: torch.Tensor, num_steps: torch.Tensor, state: dict, signal: list | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(s, compute, state)``: the 1-based step being run, whether it computes, the updated state.
        ``step`` is the last step done (0 after a reset; a step >= N means a new generation starts).
        ``signal``: with an early signal, this step's metric parts of the signal sites (their ``p_prev``
        is stale on the first step of a generation); None otherwise."""
        raise NotImplementedError

    def replay_parts(self, site: int, since: torch.Tensor) -> torch.Tensor:
        """The parts :meth:`measure` would return at ``site`` for a recorded relative change ``since``
        (``[runs]``), as :mod:`~.replay` feeds them: ``(since, 1)``, a distance over a norm of 1."""
        return torch.stack([since, torch.ones_like(since)], dim=-1)

    def measure(self, site: int, p: torch.Tensor, p_prev: torch.Tensor) -> torch.Tensor:
        """Metric parts (float32, parts last) of site ``site`` on a compute step: ``p`` now, ``p_prev`` at
        the last compute step (default: the relative L1 distance's, :func:`~.common.distance_parts`)."""
        from .common import distance_parts

        return distance_parts(p, p_prev)

    def update(self, s, compute, parts: list[torch.Tensor], state: dict, num_steps: torch.Tensor
               ) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(state, row)`` after step ``s``: ``parts`` has one vector per site (zeros on cached steps);
        ``row`` maps each of :attr:`history_columns` to this step's value (NaN where nothing was measured)."""
        raise NotImplementedError


class PolicyCall(nn.Module):
    """A graph node's handle on one method of a policy (fx ``call_module`` calls ``forward``)."""

    def __init__(self, policy: Policy, method: str):
        super().__init__()
        self.policy, self.method = policy, method

    def forward(self, *args):
        return getattr(self.policy, self.method)(*args)
