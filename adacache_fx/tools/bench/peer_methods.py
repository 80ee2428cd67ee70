"""The peers' bench methods: diffusers' cache hooks (FirstBlockCache, PAB, TaylorSeer, MagCache, FasterCache)
and cache-dit's DBCache, eager and (``-compiled``) under ``torch.compile`` as far as each allows."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from .registry import Setting, register

#: The note of a compiled peer row.
COMPILED_NOTE = "computed steps: see its eager row (blocks are not probed compiled)"


def _use_compiled(bench, holder: dict) -> None:
    """Point the pipeline at the patched transformer under ``torch.compile``, built once per setting."""
    if "model" not in holder:
        holder["model"] = torch.compile(bench.base)
    bench.pipe.transformer = holder["model"]


def _diffusers_hook(bench, key, method, setting, make_config, hint="", note="", compiled=False) -> Setting:
    """A diffusers cache hook on the uncached transformer; ``compiled``: the hooked transformer under
    ``torch.compile`` (inductor, graph breaks allowed: the hooks decide in Python), its own compiled module."""
    holder: dict[str, torch.nn.Module] = {}

    def enable():
        try:
            bench.base.enable_cache(make_config())
        except Exception:
            with contextlib.suppress(Exception):
                bench.base.disable_cache()
            raise
        if compiled:
            _use_compiled(bench, holder)

        def finish():
            bench.pipe.transformer = bench.base
            bench.pipe.maybe_free_model_hooks()  # resets the hooks' state, as diffusers pipelines do per call
            bench.base.disable_cache()

        return finish

    if compiled:
        setting = f"{setting}, inductor"
        note = "; ".join(x for x in (note, COMPILED_NOTE) if x)
    return Setting(key, method, setting, enable, hint=hint, note=note, compiled=compiled, probe=not compiled)


def _cache_dit(bench, key, method, setting, threshold: float, taylorseer: bool, compiled=False) -> Setting:
    """cache-dit's DBCache on the transformer; ``compiled``: the patched transformer under ``torch.compile``
    (inductor, graph breaks allowed; cache-dit's global ``set_compile_configs`` tweaks left out, so every
    compiled row runs under the same Inductor settings)."""
    try:
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "ERROR")
        import cache_dit

        logging.getLogger("CACHE_DIT").setLevel(logging.ERROR)  # its root logger
    except ImportError as error:
        return Setting(key, method, setting, None, reason=f"cache-dit is not installed ({error})")

    holder: dict[str, torch.nn.Module] = {}

    def enable():
        adapter = cache_dit.BlockAdapter(
            pipe=bench.pipe, transformer=bench.base, blocks=bench.base.blocks,
            forward_pattern=cache_dit.ForwardPattern.Pattern_2, has_separate_cfg=True,
        )
        warmup = 8 if bench.steps >= 24 else max(1, bench.steps // 4)  # cache-dit's default 8 is for ~28 steps
        cache_dit.enable_cache(
            adapter,
            cache_config=cache_dit.DBCacheConfig(
                Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                max_warmup_steps=warmup, num_inference_steps=bench.steps,
            ),
            calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None,
        )
        if compiled:
            _use_compiled(bench, holder)

        def finish():
            bench.pipe.transformer = bench.base
            cache_dit.disable_cache(bench.pipe)

        return finish

    if compiled:
        return Setting(key, method, f"{setting}, inductor", enable, compiled=True, probe=False, note=COMPILED_NOTE)
    return Setting(key, method, setting, enable)


@register("fbcache", "diffusers FirstBlockCache", full=(0.05, 0.1, 0.2, 0.3), quick=(0.1,))
def _fbcache(bench, key, method, v, compiled=False):
    from diffusers.hooks import FirstBlockCacheConfig

    return _diffusers_hook(bench, key, method, f"threshold {v:g}", lambda: FirstBlockCacheConfig(threshold=v),
                           compiled=compiled)


@register("pab", "diffusers PAB", full=(2,), quick=(2,))
def _pab(bench, key, method, v, compiled=False):
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    return _diffusers_hook(
        bench, key, method, f"self-attn every {v}, cross-attn every {2 * v}",
        lambda: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=v, cross_attention_block_skip_range=2 * v,
            current_timestep_callback=lambda: bench.pipe.current_timestep),
        note="attention only (FFNs always run); one state per attention for both CFG calls, so inside "
             "its timestep range the uncond call reuses the cond call's attention of the same step",
        compiled=compiled)


@register("taylorseer", "diffusers TaylorSeer", full=(2, 4), quick=(3,))
def _taylorseer(bench, key, method, v, compiled=False):
    from diffusers.hooks import TaylorSeerCacheConfig

    # The default identifiers ("^blocks.*attn", fullmatch) match no Wan module (attn1/attn2): name the blocks
    # (Wan's blocks.N; HunyuanVideo's transformer_blocks.N and single_transformer_blocks.N).
    return _diffusers_hook(
        bench, key, method, f"interval {v}, order 1, blocks",
        lambda: TaylorSeerCacheConfig(cache_interval=v, max_order=1, taylor_factors_dtype=torch.float32,
                                      cache_identifiers=[r"(\w+_)?blocks\.\d+"]),
        note="block outputs predicted (its default identifiers match no Wan module: a no-op)", compiled=compiled)


@register("magcache", "diffusers MagCache", full=(0.06, 0.2), quick=(0.1,))
def _magcache(bench, key, method, v, compiled=False):
    from diffusers.hooks import MagCacheConfig

    return _diffusers_hook(
        bench, key, method, f"threshold {v:g}, K 3, own calibration",
        lambda: MagCacheConfig(threshold=v, max_skip_steps=3, num_inference_steps=bench.steps,
                               mag_ratios=bench.mag_ratios()),
        note="ratios from its own calibration mode, on the held-out captions", compiled=compiled)


# The peers under torch.compile, at the settings nearest the 2.2-2.5x targets.
register("fbcache-compiled", "diffusers FirstBlockCache compiled", full=(0.1,), quick=(0.1,))(
    lambda bench, key, method, v: _fbcache(bench, key, method, v, compiled=True))
register("taylorseer-compiled", "diffusers TaylorSeer compiled", full=(4,), quick=(3,))(
    lambda bench, key, method, v: _taylorseer(bench, key, method, v, compiled=True))
register("magcache-compiled", "diffusers MagCache compiled", full=(0.2,), quick=(0.1,))(
    lambda bench, key, method, v: _magcache(bench, key, method, v, compiled=True))
register("pab-compiled", "diffusers PAB compiled", full=(2,), quick=(2,))(
    lambda bench, key, method, v: _pab(bench, key, method, v, compiled=True))


@register("fastercache", "diffusers FasterCache", full=("default",), quick=("default",))
def _fastercache(bench, key, method, _):
    from diffusers.hooks import FasterCacheConfig

    return _diffusers_hook(
        bench, key, method, "diffusers' example settings",
        lambda: FasterCacheConfig(spatial_attention_block_skip_range=2,
                                  current_timestep_callback=lambda: bench.pipe.current_timestep,
                                  attention_weight_callback=lambda _: 0.3, tensor_format="BCFHW"),
        hint="FasterCache derives the unconditional output from a batch holding [uncond, cond] in one "
             "call; ReferencePipeline (like diffusers' WanPipeline) runs CFG as two batch-1 calls")


def _dbcache(bench, key, method, v):
    taylorseer = "taylorseer" in key
    label = f"F1B0, threshold {v:g}" + (", TaylorSeer order 1" if taylorseer else "")
    return _cache_dit(bench, key, method, label, v, taylorseer, compiled=key.endswith("compiled"))


register("dbcache", "cache-dit DBCache", full=(0.1, 0.2), quick=(0.1,))(_dbcache)
register("dbcache-taylorseer", "cache-dit DBCache+TaylorSeer", full=(0.1, 0.2), quick=(0.2,))(_dbcache)
register("dbcache-compiled", "cache-dit DBCache compiled", full=(0.1,), quick=(0.1,))(_dbcache)
register("dbcache-taylorseer-compiled", "cache-dit DBCache+TaylorSeer compiled", full=(0.1,), quick=(0.1,))(_dbcache)
