"""``PassContext``: what the stages of the pipeline share, and the one signature every stage has.

Each pass module exposes ``run(ctx: PassContext) -> str``: it reads what the stages before it found,
adds what it finds or rewrites, and returns a one-line summary (logged at debug level). The policy is
looked up once (:attr:`PassContext.needs` says what to plan for it), built once by ``insert_cache``
with what the planning found, and the nodes that call it are recorded here (:class:`PolicyNodes`), so a
later pass finds them without looking them up by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..config import CacheConfig
from ..parallel import SequenceShard
from ..policies import Needs, Policy, policy_class
from ..policies.forecast import Forecast, forecast_for
from ..state import StateLayout


@dataclass
class PolicyNodes:
    """The rewritten graph's calls of the policy: ``decide`` (top), ``update`` (bottom), the forecast
    ``gain`` refit (``forecast_gain="fit"``), and the indices of the early-signal sites whose parts
    ``decide`` reads (its fourth argument)."""

    decide: fx.Node
    update: fx.Node
    gain: fx.Node | None = None
    signal_sites: list[int] = field(default_factory=list)


@dataclass
class PassContext:
    """The graph module being rewritten, the config, and what each stage found."""

    graph_module: fx.GraphModule
    config: CacheConfig
    process_group: object = None  # the context-parallel group (ProcessGroup or name), None: from the graph
    num_user_inputs: int = 0
    num_user_outputs: int = 0
    blocks: list = field(default_factory=list)  # find_blocks.Block
    regions: list = field(default_factory=list)  # plan_regions.Region
    sites: list = field(default_factory=list)  # plan_regions.MetricSite
    frame_layout: tuple[int, int] | None = None
    shard: SequenceShard | None = None  # the metric residual's, under context parallelism (MoReg)
    policy: Policy | None = None
    calls: PolicyNodes | None = None
    layout: StateLayout | None = None
    branch_layouts: list = field(default_factory=list)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def needs(self) -> Needs:
        """What the config's policy reads from the graph."""
        return policy_class(self.config).needs(self.config)

    @property
    def forecast(self) -> Forecast:
        """What a cached step adds (the config's ``extrapolation_order`` and ``forecast_gain``)."""
        return forecast_for(self.config)
