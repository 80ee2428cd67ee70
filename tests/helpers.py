"""Shared test helpers: run a denoising-like loop and compare outputs."""

from __future__ import annotations

import torch


def first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    return first_tensor(output.sample)


@torch.no_grad()
def run_steps(model, make_inputs, num_steps):
    return [first_tensor(model(**make_inputs(s))).clone() for s in range(num_steps)]


def max_diff(a_list, b_list):
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(a_list, b_list))
