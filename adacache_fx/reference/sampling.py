"""Minimal Euler sampler for the rectified-flow reference model (to be superseded by a diffusers pipeline).

Convention (as in training): ``x_t = (1 - t) * x0 + t * noise``; the model predicts ``v = noise - x0`` from
``x_t`` and the timestep ``1000 * t``. Sampling integrates from pure noise at ``t = 1`` down to ``t = 0``.
"""

from __future__ import annotations

import itertools

import torch

from .data import CHANNELS, HEIGHT, NUM_FRAMES, WIDTH, Caption


@torch.no_grad()
def sample(
    transformer: torch.nn.Module,
    caption_encoder: torch.nn.Module,
    captions: list[str | Caption],
    num_steps: int = 30,
    guidance_scale: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """Generate clips ``[B, 3, 8, 32, 32]`` in [-1, 1] with classifier-free guidance.

    ``guidance_scale = 1`` disables guidance (no unconditional pass).
    """
    device = next(transformer.parameters()).device
    texts = [c.text if isinstance(c, Caption) else c for c in captions]
    batch = len(texts)
    use_cfg = guidance_scale != 1.0
    context = caption_encoder.encode(texts + [""] * batch if use_cfg else texts).to(device)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, NUM_FRAMES, HEIGHT, WIDTH, generator=generator).to(device)
    ts = torch.linspace(1.0, 0.0, num_steps + 1)
    for t, t_next in itertools.pairwise(ts.tolist()):
        model_in = torch.cat([x, x]) if use_cfg else x
        timestep = torch.full((model_in.shape[0],), t * 1000.0, device=device)
        v = transformer(model_in, timestep, context, return_dict=False)[0]
        if use_cfg:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        x = x - (t - t_next) * v
    return x.clamp(-1.0, 1.0)
