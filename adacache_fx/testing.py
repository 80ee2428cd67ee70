"""A tiny plain-torch video DiT for examples and quick checks (torch only, random weights).

>>> from adacache_fx.testing import tiny_dit
>>> model, make_inputs = tiny_dit()
>>> model(**make_inputs(0)).shape
torch.Size([1, 4, 2, 8, 8])
"""

from __future__ import annotations

import torch
from torch import nn


class TinyBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text, MLP, each a residual branch."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, text):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.cross(self.norm2(x), text, text, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


class TinyDiT(nn.Module):
    """``[B, C, T, H, W]`` latents -> patch embedding (3-D conv) -> blocks -> the same shape."""

    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 2, depth: int = 4, text_dim: int = 16):
        super().__init__()
        self.embed = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, channels * 4)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, c, t, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        x = x + self.time(timestep.reshape(-1, 1, 1).to(x.dtype) / 1000)
        text = self.text(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, text)
        x = self.head(x).reshape(b, t, h // 2, w // 2, c, 2, 2)
        return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, t, h, w)


def tiny_dit(seed: int = 0, frames: int = 2, size: int = 8):
    """``(model, make_inputs)``: a :class:`TinyDiT` and ``make_inputs(step) -> kwargs`` of a denoising-like
    loop (latents drifting with the step, timestep falling from 999)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyDiT().eval()
    latents = torch.randn(1, 4, frames, size, size, generator=generator)
    text = torch.randn(1, 8, 16, generator=generator)

    def make_inputs(step: int) -> dict:
        return {"hidden_states": latents + 0.05 * step, "timestep": torch.tensor([999.0 - 30 * step]),
                "encoder_hidden_states": text}

    return model, make_inputs
