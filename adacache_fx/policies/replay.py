"""Replay a policy's own tensor code on recorded metrics: the schedule it would choose, for calibration.

Calibration records uncached generations (every step computes) and asks what a config *would* compute.
The rule is not written a second time: :func:`replay` builds the config's :class:`~.base.Policy` and
runs its ``decide`` / ``update`` on every recorded run at once (state of shape ``[runs]``), feeding it
metric parts made from the recording:

* ``changes[r, s - 2]``: run ``r``'s relative L1 change of the metric residual (or of the early signal)
  between steps ``s - 1`` and ``s`` (``s = 2..N``), as :func:`adacache_fx.calibrate.record_metrics` and
  ``record_teacache`` read them;
* at a compute step ``s`` whose previous compute step is ``l``, the change since ``l`` is approximated
  by the sum ``changes[l + 1] + ... + changes[s]`` (the triangle inequality taken as an equality: exact
  when the residual drifts one way, an over-estimate when it oscillates, where the real run then computes
  fewer steps than predicted); a NaN in the interval makes it NaN, which the rule handles as the graph
  does (AdaCache takes its last rate, AdaCache+ and TeaCache compute);
* an early signal kept on every step (TeaCache) reads the step-to-step change itself.

It is a prediction: once a step is cached, the real run's latents, and so its metric, differ from the
uncached recording. Motion regularization is not replayed (a config's ``moreg`` is dropped).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .base import GraphFacts
from .registry import make_policy, policy_class


def replay(config, changes, num_steps: int) -> torch.Tensor:
    """``[runs, N]`` bools: the steps ``config``'s policy computes on each recorded run (module doc)."""
    if getattr(config, "moreg", None) is not None:
        config = replace(config, moreg=None)
    needs = policy_class(config).needs(config)
    policy = make_policy(config, GraphFacts(num_sites=int(needs.early_signal is not None) + int(needs.metric)))
    d = torch.as_tensor(changes, dtype=torch.float64).reshape(len(changes), -1)[:, : max(0, num_steps - 1)]
    runs = d.shape[0]
    # cumulative sums with steps 1..N on the columns: the change between steps l and s is sum(s) - sum(l)
    zero = torch.zeros(runs, 2, dtype=torch.float64)
    total = torch.cat([zero, torch.nan_to_num(d, nan=0.0).cumsum(1)], dim=1)  # total[:, s] for s = 0..N
    nans = torch.cat([zero, torch.isnan(d).to(torch.float64).cumsum(1)], dim=1)
    if total.shape[1] < num_steps + 1:  # fewer recorded steps than N: the rest changes by 0
        pad = num_steps + 1 - total.shape[1]
        total, nans = (torch.cat([t, t[:, -1:].expand(runs, pad)], 1) for t in (total, nans))
    rows = torch.arange(runs)

    def parts(s: int, last: torch.Tensor, site: int) -> torch.Tensor:
        since = total[:, s] - total[rows, last]
        since = torch.where(nans[:, s] > nans[rows, last], torch.full_like(since, math.nan), since)
        return policy.replay_parts(site, since.to(torch.float32))

    early = needs.early_signal is not None

    state = {spec.name: torch.full((runs,), spec.fill, dtype=spec.dtype) for spec in policy.state_specs()}
    step = torch.zeros(runs, dtype=torch.int64)
    n = torch.full((runs,), num_steps, dtype=torch.int64)
    last = torch.ones(runs, dtype=torch.int64)
    computed = torch.zeros(runs, num_steps, dtype=torch.bool)
    with torch.no_grad():
        for s in range(1, num_steps + 1):
            signal = None
            if early:
                kept = torch.full_like(last, s - 1) if needs.remember_signal == "every" else last
                signal = [parts(s, kept.clamp_min(1), 0)]
            step, compute, state = policy.decide(step, n, state, signal)
            measured = [parts(s, last, int(early))] if needs.metric else []
            measured = [torch.where(compute.unsqueeze(-1), m, torch.zeros_like(m)) for m in measured]
            state, _ = policy.update(step, compute, (signal or []) + measured, state, n)  # the signal's again
            last = torch.where(compute, step, last)
            computed[:, s - 1] = compute
    return computed


def mean_computed(config, changes, num_steps: int) -> float:
    """The mean number of steps ``config`` computes over the recorded runs (:func:`replay`)."""
    return float(replay(config, changes, num_steps).sum(1).to(torch.float64).mean())


def schedule(config, changes, num_steps: int) -> list[int]:
    """The 1-based compute steps of one recorded run."""
    return [s + 1 for s in torch.nonzero(replay(config, [changes], num_steps)[0]).flatten().tolist()]


#: The step-to-step change :func:`fewest_computed` replays: next to nothing, but not 0 (a rule that
#: measures a rate of change, EasyCache's, needs some change to measure).
TINY_CHANGE = 1e-6


def fewest_computed(config, num_steps: int) -> list[int]:
    """The steps ``config`` computes over ``num_steps`` when next to nothing changes between steps: the
    steps its rule always computes (the first ones, the forced last ones)."""
    return schedule(config, [TINY_CHANGE] * max(0, num_steps - 1), num_steps)


def nothing_to_skip(config, num_steps: int) -> list[int] | None:
    """The steps that leave nothing to skip: ``fewest_computed`` when it is every one of ``num_steps``
    steps while the same config skips at a larger N (a config that never skips, such as
    ``codebook=presets.NEVER``, is what the user asked for). None when some step can be skipped."""
    fewest = fewest_computed(config, num_steps)
    if len(fewest) < num_steps:
        return None
    larger = max(2 * num_steps, 50)
    try:
        skips_elsewhere = len(fewest_computed(config, larger)) < larger
    except ValueError:  # a config made for this N only
        skips_elsewhere = True
    return fewest if skips_elsewhere else None
