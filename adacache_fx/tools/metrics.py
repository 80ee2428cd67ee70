"""Video quality against a reference: PSNR, and SSIM from ``pytorch_msssim`` (a maintained implementation)."""

from __future__ import annotations

import math

import torch


def psnr(video: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements (inf for identical videos)."""
    mse = float(((video.double() - reference.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(video: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM over frames; videos ``[T, C, H, W]`` (or ``[B, T, C, H, W]``) in ``[0, data_range]``."""
    from pytorch_msssim import ssim as _ssim

    a = video.float().reshape(-1, *video.shape[-3:])
    b = reference.float().reshape(-1, *reference.shape[-3:])
    win = 7 if min(a.shape[-2:]) < 64 else 11  # the window must fit the frame
    return float(_ssim(a, b, data_range=data_range, win_size=win))
