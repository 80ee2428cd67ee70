"""Tiny random-weight DiTs for the tests: 11 diffusers transformers and an Open-Sora-STDiT-style model.

Each factory returns ``(model, make_inputs)``; ``make_inputs(step)`` gives the keyword arguments of one
denoising step (same latents shape, a decreasing timestep, slightly drifting latents so residuals
change between steps as in a real loop).
"""

from __future__ import annotations

import torch
from torch import nn

FAMILIES = [
    "wan",
    "cogvideox",
    "latte",
    "hunyuan_video",
    "ltx_video",
    "mochi",
    "allegro",
    "pixart",
    "dit",
    "sd3",
    "flux",
    "stdit",
]
VIDEO_FAMILIES = ["wan", "cogvideox", "latte", "hunyuan_video", "mochi", "allegro", "stdit"]


def _drift(base: torch.Tensor, step: int) -> torch.Tensor:
    """Latents moving smoothly along a fixed direction, with a little fresh noise per step."""
    direction = torch.randn(base.shape, generator=torch.Generator().manual_seed(999), dtype=base.dtype)
    jitter = torch.randn(base.shape, generator=torch.Generator().manual_seed(1000 + step), dtype=base.dtype)
    return base + 0.02 * step * direction + 0.004 * jitter


def _timestep(step: int, integer: bool = True) -> torch.Tensor:
    value = 999 - 33 * step
    return torch.tensor([value]) if integer else torch.tensor([value / 1000.0])


def build(family: str, num_layers: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Return ``(model, make_inputs)`` for a tiny model of ``family``."""
    torch.manual_seed(seed)
    model, latents, extra, int_t = _FACTORIES[family](num_layers)
    model = model.eval().to(dtype)
    latents = latents.to(dtype)
    extra = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in extra.items()}

    def make_inputs(step: int = 0) -> dict:
        kwargs = {"hidden_states": _drift(latents, step), "timestep": _timestep(step, int_t), **extra}
        if family == "stdit":
            kwargs.pop("return_dict", None)
        return kwargs

    return model, make_inputs


def _wan(n):
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=n, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    return m, torch.randn(1, 4, 2, 8, 8), {"encoder_hidden_states": torch.randn(1, 8, 16), "return_dict": False}, True


def _cogvideox(n):
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=n, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    )
    return m, torch.randn(1, 2, 4, 8, 8), {"encoder_hidden_states": torch.randn(1, 8, 16), "return_dict": False}, True


def _latte(n):
    from diffusers import LatteTransformer3DModel

    m = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=n,
        cross_attention_dim=32, attention_bias=True, sample_size=8, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=16, video_length=2,
    )
    extra = {"encoder_hidden_states": torch.randn(1, 8, 16), "enable_temporal_attentions": True, "return_dict": False}
    return m, torch.randn(1, 4, 2, 8, 8), extra, True


def _hunyuan_video(n):
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=n // 2,
        num_single_layers=n - n // 2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
    )
    extra = {
        "encoder_hidden_states": torch.randn(1, 8, 16),
        "encoder_attention_mask": torch.ones(1, 8, dtype=torch.int64),
        "pooled_projections": torch.randn(1, 16),
        "guidance": torch.tensor([3500.0]),
        "return_dict": False,
    }
    return m, torch.randn(1, 4, 2, 8, 8), extra, True


def _ltx_video(n):
    from diffusers import LTXVideoTransformer3DModel

    m = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=n, qk_norm="rms_norm_across_heads", caption_channels=16,
    )
    extra = {
        "encoder_hidden_states": torch.randn(1, 8, 16),
        "encoder_attention_mask": torch.ones(1, 8, dtype=torch.int64),
        "num_frames": 2, "height": 8, "width": 8, "return_dict": False,
    }
    return m, torch.randn(1, 128, 4), extra, True


def _mochi(n):
    from diffusers import MochiTransformer3DModel

    m = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=n, pooled_projection_dim=16,
        in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=16,
        activation_fn="swiglu", max_sequence_length=8,
    )
    extra = {
        "encoder_hidden_states": torch.randn(1, 8, 16),
        "encoder_attention_mask": torch.ones(1, 8, dtype=torch.int64),
        "return_dict": False,
    }
    return m, torch.randn(1, 4, 2, 8, 8), extra, True


def _allegro(n):
    from diffusers import AllegroTransformer3DModel

    m = AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=n,
        cross_attention_dim=32, sample_width=8, sample_height=8, sample_frames=2, caption_channels=16,
    )
    return m, torch.randn(1, 4, 2, 8, 8), {"encoder_hidden_states": torch.randn(1, 8, 16), "return_dict": False}, True


def _pixart(n):
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(
        sample_size=8, num_layers=n, patch_size=2, attention_head_dim=16, num_attention_heads=2, in_channels=4,
        cross_attention_dim=32, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False, caption_channels=16,
    )
    extra = {
        "encoder_hidden_states": torch.randn(1, 8, 16),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }
    return m, torch.randn(1, 4, 8, 8), extra, True


def _dit(n):
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(
        in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2,
        attention_head_dim=16, attention_bias=True, num_layers=n, norm_type="ada_norm_zero",
        num_embeds_ada_norm=10, patch_size=2, sample_size=8,
    )
    return m, torch.randn(1, 4, 8, 8), {"class_labels": torch.tensor([3]), "return_dict": False}, True


def _sd3(n):
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=n, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    )
    extra = {"encoder_hidden_states": torch.randn(1, 8, 16), "pooled_projections": torch.randn(1, 16),
             "return_dict": False}
    return m, torch.randn(1, 4, 8, 8), extra, True


def _flux(n):
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=n // 2, num_single_layers=n - n // 2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    extra = {
        "encoder_hidden_states": torch.randn(1, 8, 16),
        "pooled_projections": torch.randn(1, 16),
        "img_ids": torch.randn(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
        "return_dict": False,
    }
    return m, torch.randn(1, 16, 4), extra, False


class STDiTBlock(nn.Module):
    """Open-Sora-STDiT-style block: spatial or temporal self-attention, cross-attention, MLP, adaLN gates."""

    def __init__(self, dim: int, heads: int, temporal: bool):
        super().__init__()
        self.temporal, self.heads = temporal, heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, y, t, frames: int):
        b, n, c = x.shape
        s = n // frames
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(b, 6, -1)
        ).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        if self.temporal:
            h = h.reshape(b, frames, s, c).transpose(1, 2).reshape(b * s, frames, c)
        else:
            h = h.reshape(b * frames, s, c)
        h = self.attn(h, h, h, need_weights=False)[0]
        if self.temporal:
            h = h.reshape(b, s, frames, c).transpose(1, 2).reshape(b, n, c)
        else:
            h = h.reshape(b, n, c)
        x = x + gate_msa * h
        x = x + self.cross(x, y, y, need_weights=False)[0]
        x = x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x


class TinySTDiT(nn.Module):
    """A plain-torch Open-Sora-STDiT-style video DiT: alternating spatial and temporal blocks."""

    def __init__(self, num_layers: int = 4, dim: int = 32, heads: int = 2, in_channels: int = 4, patch: int = 2):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv3d(in_channels, dim, (1, patch, patch), (1, patch, patch))
        self.t_embed = nn.Sequential(nn.Linear(32, dim), nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embed = nn.Linear(16, dim)
        self.blocks = nn.ModuleList(STDiTBlock(dim, heads, temporal=i % 2 == 1) for i in range(num_layers))
        self.out = nn.Linear(dim, in_channels * patch * patch)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, c, f, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        half = torch.exp(-torch.arange(16, dtype=torch.float32) * 0.5)
        freq = timestep.float()[:, None] * half[None]
        t = self.t_embed(torch.cat([freq.sin(), freq.cos()], dim=-1).to(hidden_states.dtype))
        y = self.y_embed(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, y, t, f)
        x = self.out(x)
        p = self.patch
        x = x.reshape(b, f, h // p, w // p, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, f, h, w)


def _stdit(n):
    return TinySTDiT(num_layers=n), torch.randn(1, 4, 4, 8, 8), {"encoder_hidden_states": torch.randn(1, 8, 16)}, True


_FACTORIES = {
    "wan": _wan,
    "cogvideox": _cogvideox,
    "latte": _latte,
    "hunyuan_video": _hunyuan_video,
    "ltx_video": _ltx_video,
    "mochi": _mochi,
    "allegro": _allegro,
    "pixart": _pixart,
    "dit": _dit,
    "sd3": _sd3,
    "flux": _flux,
    "stdit": _stdit,
}
