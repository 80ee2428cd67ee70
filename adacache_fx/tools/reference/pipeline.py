"""``ReferencePipeline``: caption in, video out, for the bundled reference model (diffusers conventions).

Rectified flow as in training: ``x_t = (1 - t) * x0 + t * noise``, the transformer predicts the velocity
``noise - x0`` at timestep ``1000 t``; ``FlowMatchEulerDiscreteScheduler`` integrates from noise (t = 1) to
the clip (t = 0). Classifier-free guidance runs the conditional and unconditional (empty caption) passes
as two calls inside ``transformer.cache_context("cond" / "uncond", step_index=..., num_inference_steps=...)``
like diffusers' Wan pipeline, so caching transforms see both contexts. The loop steps the scheduler (not
``fixtures.euler_flow``, the same Euler update) because ``adacache_fx.enable`` follows ``scheduler.step_index``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from .data import CHANNELS, HEIGHT, NUM_FRAMES, WIDTH


@dataclass
class ReferencePipelineOutput(BaseOutput):
    """``frames``: ``[B, T, C, H, W]`` in [0, 1] (``output_type="pt"``) or ``[B, T, H, W, C]`` uint8 (``"np"``)."""

    frames: torch.Tensor | np.ndarray


class ReferencePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "caption_encoder->transformer"

    def __init__(self, transformer, caption_encoder, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, caption_encoder=caption_encoder, scheduler=scheduler)
        self._current_timestep = None
        self._guidance_scale = 1.0
        self._num_timesteps = 0

    @property
    def current_timestep(self):
        """The scheduler timestep of the running step (``None`` outside a call), as in diffusers' pipelines;
        diffusers' cache hooks (e.g. PyramidAttentionBroadcast) read it through a callback."""
        return self._current_timestep

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @classmethod
    def from_reference(cls, path=None, device="cpu") -> ReferencePipeline:
        """The pipeline with the bundled trained weights (``adacache_fx/tools/reference/weights``)."""
        from .model import load_reference_model

        transformer, caption_encoder = load_reference_model(path, device)
        return cls(transformer, caption_encoder, FlowMatchEulerDiscreteScheduler(shift=1.0))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 30,
        guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if output_type not in ("pt", "np"):
            raise ValueError(f"output_type must be 'pt' or 'np', got {output_type!r}")
        device = next(self.transformer.parameters()).device
        dtype = self.transformer.dtype
        cond = {k: v.to(device, dtype) for k, v in self.caption_encoder.encode_conditioning(prompts).items()}
        uncond = {k: v.to(device, dtype) for k, v in self.caption_encoder.encode_conditioning([""] * len(prompts)).items()}
        shape = (len(prompts), CHANNELS, NUM_FRAMES, HEIGHT, WIDTH)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._guidance_scale = guidance_scale
        self._num_timesteps = len(timesteps)
        loop = {"num_inference_steps": len(timesteps)}
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                self._current_timestep = t
                x = latents.to(dtype)
                timestep = t.expand(x.shape[0]).to(dtype)
                with self.transformer.cache_context("cond", step_index=i, **loop):
                    v = self.transformer(x, timestep, **cond, return_dict=False)[0]
                if guidance_scale != 1.0:
                    with self.transformer.cache_context("uncond", step_index=i, **loop):
                        v_uncond = self.transformer(x, timestep, **uncond, return_dict=False)[0]
                    v = v_uncond + guidance_scale * (v - v_uncond)
                latents = self.scheduler.step(v.float(), t, latents, return_dict=False)[0]
                progress.update()
        self._current_timestep = None
        self.maybe_free_model_hooks()  # as diffusers pipelines: resets stateful cache hooks for the next call
        frames = ((latents.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)  # [B, T, C, H, W]
        if output_type == "np":
            frames = (frames.permute(0, 1, 3, 4, 2) * 255).round().to(torch.uint8).cpu().numpy()
        if not return_dict:
            return (frames,)
        return ReferencePipelineOutput(frames=frames)
