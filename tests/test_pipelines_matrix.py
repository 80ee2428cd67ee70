"""Seven diffusers pipelines x the scheduler families they ship with, driven through ``adacache_fx.enable``.

Tiny random components, prompt embeddings passed directly (no tokenizer files), latents out (no VAE
decode). Per pipeline and scheduler: never-skip output identical to the pipeline, the default config
computes fewer than N steps, a second call identical to the first, the expected cache contexts, and
2-step calls exact. Each pipeline family is built once (module cache) and shared by three pipeline
objects: plain, never-skip and default config.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import adacache_fx as ax
from adacache_fx.integrations.diffusers import _FOLLOWERS
from adacache_fx.tools.fixtures import components
from adacache_fx.tools.fixtures.wan import PIPELINE_WAN, wan_transformer

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # the pipelines' modules import it

STEPS = 8


def _cogvideox():
    from diffusers import CogVideoXPipeline

    vae = components.tiny_cogvideox_vae()
    pipe = dict(tokenizer=None, text_encoder=None, vae=vae, transformer=components.tiny_cogvideox_transformer())
    # 5 frames -> 2 latent frames, 16x16 pixels (vae factor 2) -> the 8x8 latents of the config
    call = dict(height=16, width=16, num_frames=5, guidance_scale=6.0, max_sequence_length=8,
                **_embeds(8, 16, negative=True))
    return CogVideoXPipeline, pipe, call


def _embeds(length, dim, negative=False, mask=False, pooled=None, prefix=""):
    g = torch.Generator().manual_seed(7)
    out = {f"{prefix}prompt_embeds": torch.randn(1, length, dim, generator=g)}
    if negative:
        out[f"negative_{prefix}prompt_embeds"] = torch.randn(1, length, dim, generator=g)
    if mask:
        out[f"{prefix}prompt_attention_mask"] = torch.ones(1, length, dtype=torch.int64)
        if negative:
            out[f"negative_{prefix}prompt_attention_mask"] = torch.ones(1, length, dtype=torch.int64)
    if pooled:
        out["pooled_prompt_embeds"] = torch.randn(1, pooled, generator=g)
        if negative:
            out["negative_pooled_prompt_embeds"] = torch.randn(1, pooled, generator=g)
    return out


def _image_vae(latent_channels=4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=latent_channels,
        layers_per_block=1, norm_num_groups=2,
    )


def _latte():
    from diffusers import LattePipeline, LatteTransformer3DModel

    transformer = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=32, attention_bias=True, sample_size=8, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=16, video_length=2,
    )
    pipe = dict(tokenizer=None, text_encoder=None, vae=_image_vae(), transformer=transformer)
    call = dict(height=16, width=16, video_length=2, guidance_scale=4.5, negative_prompt=None,
                clean_caption=False, mask_feature=False, **_embeds(8, 16, negative=True))
    return LattePipeline, pipe, call


def _pixart():
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=16, num_attention_heads=2, in_channels=4,
        cross_attention_dim=32, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False, caption_channels=16,
    )
    pipe = dict(tokenizer=None, text_encoder=None, vae=_image_vae(), transformer=transformer)
    call = dict(height=16, width=16, guidance_scale=4.5, negative_prompt=None, use_resolution_binning=False,
                max_sequence_length=8, **_embeds(8, 16, negative=True, mask=True))
    return PixArtSigmaPipeline, pipe, call


def _ltx():
    from diffusers import LTXPipeline

    vae = components.tiny_ltx_vae()
    pipe = dict(tokenizer=None, text_encoder=None, vae=vae, transformer=components.tiny_ltx_transformer())
    call = dict(height=32, width=32, num_frames=5, guidance_scale=3.0, max_sequence_length=8,
                **_embeds(8, 16, negative=True, mask=True))
    return LTXPipeline, pipe, call


def _hunyuan():
    from diffusers import HunyuanVideoPipeline

    vae = components.tiny_hunyuan_vae()
    transformer = components.tiny_hunyuan_transformer()
    pipe = dict(tokenizer=None, text_encoder=None, tokenizer_2=None, text_encoder_2=None, vae=vae,
                transformer=transformer)
    # true CFG: the negative embeddings and true_cfg_scale > 1 add an "uncond" call per step
    call = dict(height=16, width=16, num_frames=5, guidance_scale=6.0, true_cfg_scale=2.0,
                **_embeds(8, 16, negative=True, mask=True, pooled=16))
    return HunyuanVideoPipeline, pipe, call


def _wan():
    from diffusers import WanPipeline

    vae = components.tiny_wan_vae()
    transformer = wan_transformer(1, **PIPELINE_WAN)
    pipe = dict(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer)
    call = dict(height=16, width=16, num_frames=5, guidance_scale=5.0, **_embeds(8, 32, negative=True))
    return WanPipeline, pipe, call


def _flux():
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = dict(tokenizer=None, text_encoder=None, tokenizer_2=None, text_encoder_2=None, vae=_image_vae(),
                transformer=transformer)
    # true CFG (true_cfg_scale > 1 with negative embeddings): a "cond" and an "uncond" call per step
    call = dict(height=16, width=16, guidance_scale=3.5, true_cfg_scale=2.0, max_sequence_length=8,
                **_embeds(8, 16, negative=True, pooled=16))
    return FluxPipeline, pipe, call


def _scheduler(name):
    import diffusers as d

    return {
        "ddim": lambda: d.DDIMScheduler(),
        "dpmsolver": lambda: d.DPMSolverMultistepScheduler(),
        "unipc": lambda: d.UniPCMultistepScheduler(),
        "euler": lambda: d.EulerDiscreteScheduler(),
        "flow_euler": lambda: d.FlowMatchEulerDiscreteScheduler(shift=3.0),
        "flow_unipc": lambda: d.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                        flow_shift=3.0),
        "cogvideox_ddim": lambda: d.CogVideoXDDIMScheduler(),
        "cogvideox_dpm": lambda: d.CogVideoXDPMScheduler(),
    }[name]()


#: family: (builder, the schedulers it is tested with, the cache contexts of one call)
FAMILIES = {
    "cogvideox": (_cogvideox, ("cogvideox_ddim", "cogvideox_dpm"), ["cond_uncond"]),
    "latte": (_latte, ("ddim", "euler"), ["default"]),
    "pixart": (_pixart, ("dpmsolver", "ddim", "unipc"), ["default"]),
    "ltx": (_ltx, ("flow_euler",), ["cond_uncond"]),
    "hunyuan_video": (_hunyuan, ("flow_euler",), ["cond", "uncond"]),
    "wan": (_wan, ("flow_unipc", "flow_euler"), ["cond", "uncond"]),
    "flux": (_flux, ("flow_euler",), ["cond", "uncond"]),
}
CASES = [(family, sched) for family, (_, scheds, _) in FAMILIES.items() for sched in scheds]


class Family:
    """One family's components, shared by a plain, a never-skip and a default-config pipeline."""

    def __init__(self, name):
        torch.manual_seed(0)
        cls, components, self.call = FAMILIES[name][0]()
        components = {k: v.eval() if isinstance(v, torch.nn.Module) else v for k, v in components.items()}
        self.contexts = FAMILIES[name][2]
        self.pipes = {}
        for variant in ("plain", "never", "default"):
            pipe = cls(scheduler=_scheduler(FAMILIES[name][1][0]), **components)
            pipe.set_progress_bar_config(disable=True)
            self.pipes[variant] = pipe
        self.never = ax.enable(self.pipes["never"], ax.AdaCacheConfig(codebook=ax.presets.NEVER))
        self.default = ax.enable(self.pipes["default"])

    def run(self, variant, scheduler, steps, seed=0):
        pipe = self.pipes[variant]
        if type(pipe.scheduler).__name__ != type(scheduler).__name__ or pipe.scheduler.config != scheduler.config:
            pipe.scheduler = scheduler
        with torch.no_grad():
            out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="latent",
                       **self.call)
        return (out.frames if hasattr(out, "frames") else out.images).clone()


@functools.cache
def family(name) -> Family:
    return Family(name)


@pytest.mark.parametrize("name,sched", CASES)
def test_never_skip_equals_pipeline_and_default_caches(name, sched):
    fam = family(name)
    expected = fam.run("plain", _scheduler(sched), STEPS)
    assert torch.equal(fam.run("never", _scheduler(sched), STEPS), expected)
    assert fam.never.generation_contexts == fam.contexts
    for context in fam.contexts:
        rep = ax.report(fam.never, context)
        assert rep.num_steps == STEPS and rep.computed_steps == list(range(1, STEPS + 1))

    first = fam.run("default", _scheduler(sched), STEPS)
    computed = {c: ax.report(fam.default, c).computed_steps for c in fam.contexts}
    assert fam.default.generation_contexts == fam.contexts
    for steps in computed.values():
        assert steps[0] == 1 and steps[-2:] == [STEPS - 1, STEPS] and len(steps) < STEPS
    second = fam.run("default", _scheduler(sched), STEPS)
    assert torch.equal(first, second)
    assert {c: ax.report(fam.default, c).computed_steps for c in fam.contexts} == computed


@pytest.mark.parametrize("name,sched", CASES)
def test_two_steps_compute_every_step_with_one_warning(name, sched):
    fam = family(name)
    expected = fam.run("plain", _scheduler(sched), 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fam.run("default", _scheduler(sched), 2)
    assert torch.equal(got, expected)
    messages = [str(w.message) for w in caught if "adacache_fx" in str(w.message)]
    assert len(messages) == 1 and "fewer than 3" in messages[0]
    for context in fam.contexts:
        rep = ax.report(fam.default, context)
        assert rep.num_steps == 2 and rep.computed_steps == [1, 2]


def test_report_refuses_a_context_the_latest_generation_did_not_use():
    fam = family("flux")
    fam.run("default", _scheduler("flow_euler"), STEPS)
    assert fam.default.generation_contexts == ["cond", "uncond"]
    pipe = fam.pipes["default"]
    call = {k: v for k, v in fam.call.items() if not k.startswith("negative_")}  # no true CFG: "cond" only
    with torch.no_grad():
        pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent", **call)
    assert fam.default.generation_contexts == ["cond"]
    assert "uncond" in fam.default.contexts  # it still holds the earlier generation's state
    assert ax.report(fam.default, "cond").num_steps == STEPS
    with pytest.raises(RuntimeError, match="'uncond' was not used in the latest generation"):
        ax.report(fam.default, "uncond")


def test_disable_undoes_every_wrapping():
    fam = family("pixart")
    components = dict(fam.pipes["plain"].components)
    transformer, scheduler = components["transformer"], _scheduler("ddim")
    pipe = type(fam.pipes["plain"])(**{**components, "scheduler": scheduler})
    cached = ax.enable(pipe)
    assert "set_timesteps" in vars(scheduler) and pipe.transformer is cached
    swapped = pipe.scheduler = _scheduler("dpmsolver")
    _FOLLOWERS[cached][0].watch(swapped)  # what the next call does on seeing the swap
    assert "set_timesteps" in vars(swapped) and "set_timesteps" not in vars(scheduler)
    ax.disable(pipe)
    assert pipe.transformer is transformer and "set_timesteps" not in vars(swapped)
    assert not cached._prepare_hooks


def test_a_scheduler_without_set_timesteps_is_named_in_one_warning():
    from types import SimpleNamespace

    from adacache_fx.integrations.diffusers import GenerationFollower

    class Stepper:  # timesteps, but no set_timesteps and no step_index
        timesteps = torch.arange(10)

    pipe = SimpleNamespace(scheduler=Stepper())
    follower = GenerationFollower(pipe)
    model = ax.transform(torch.nn.Linear(2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        follower(model, (), {})
        follower(model, (), {})
    assert [str(w.message) for w in caught if "Stepper" in str(w.message)] == [
        str(caught[0].message)] and "cannot tell where a generation starts" in str(caught[0].message)
    assert model.num_steps == 10


def test_an_interrupted_generation_does_not_leak_into_the_next():
    fam = family("flux")
    full = fam.run("default", _scheduler("flow_euler"), STEPS)

    def stop_after_three_steps(pipe, i, t, callback_kwargs):
        pipe._interrupt = i >= 2  # diffusers' documented way to stop a generation early
        return {}

    pipe = fam.pipes["default"]
    with torch.no_grad():
        pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent",
             callback_on_step_end=stop_after_three_steps, **fam.call)
    assert len(ax.report(fam.default, "cond").steps) == 3  # both contexts stopped mid-generation
    assert torch.equal(fam.run("default", _scheduler("flow_euler"), STEPS), full)
