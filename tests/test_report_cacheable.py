"""Report.always_computed / max_cacheable: how many of N steps a policy can cache at all, at few steps."""

from __future__ import annotations

import warnings

import pytest
import torch

import adacache_fx as ax
from adacache_fx.tools.fixtures import tiny_dit


def still_generation(config, num_steps):
    """A generation whose inputs never change: the metric is 0, so the policy caches all it can."""
    model, make_inputs = tiny_dit()
    cached = ax.transform(model, config)
    inputs = make_inputs(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nothing-to-skip warning at N = 4 (tested in test_policy)
        with torch.no_grad():
            for _ in range(num_steps):
                cached(**inputs)
    return ax.report(cached)


# steps 1, 2 (the first compute, the first metric) and N-1, N (forced) always compute
@pytest.mark.parametrize("num_steps, always", [(4, (1, 2, 3, 4)), (6, (1, 2, 5, 6)), (8, (1, 2, 7, 8))])
def test_default_policy_at_few_steps(num_steps, always):
    report = still_generation(ax.AdaCacheConfig(num_steps=num_steps), num_steps)
    assert report.num_steps == num_steps
    assert report.computed_steps == list(always)  # nothing changes: only the forced steps compute
    assert report.always_computed == always and report.max_cacheable == num_steps - len(always)
    assert f"at most {report.max_cacheable} of {num_steps} steps can be cached" in str(report)


def test_never_skip_caches_nothing_and_a_forced_schedule_its_complement():
    assert still_generation(ax.AdaCacheConfig(num_steps=6, codebook=ax.presets.NEVER), 6).max_cacheable == 0
    report = still_generation(ax.AdaCacheConfig(num_steps=8, compute_steps=[1, 2, 5, 7, 8]), 8)
    assert report.always_computed == (1, 2, 5, 7, 8) and report.max_cacheable == 3
