"""The metric is read on the latent (video) stream, chosen from the graph's structure, not by size; MoReg's
errors say what to do."""

import pytest
import torch
from helpers import run_steps

import adacache_fx as ax
from adacache_fx.tools.fixtures import build

pytest.importorskip("diffusers")


def more_text_than_video(family: str, text: int = 64):
    """A tiny model of ``family`` called with more text tokens than video tokens (2 x 16 or 16 of them)."""
    model, make_inputs = build(family)
    if family == "cogvideox":  # the text length is part of its config (positional embedding)
        from diffusers import CogVideoXTransformer3DModel

        config = {**model.config, "max_text_seq_length": text}
        model = CogVideoXTransformer3DModel.from_config(config).eval()

    def inputs(step=0):
        kwargs = make_inputs(step)
        kwargs["encoder_hidden_states"] = torch.randn(1, text, 16, generator=torch.Generator().manual_seed(1))
        if "txt_ids" in kwargs:
            kwargs["txt_ids"] = torch.zeros(text, 3)
        if "encoder_attention_mask" in kwargs:
            kwargs["encoder_attention_mask"] = torch.ones(1, text, dtype=torch.int64)
        return kwargs

    return model, inputs


@pytest.mark.parametrize("family,video_tokens,moreg", [
    ("flux", 16, ax.MoRegConfig(frames=2)),  # no convolutional patch embedding: the user gives T
    ("cogvideox", 32, ax.MoRegConfig()),  # frames inferred from the patch embedding; text and video concatenated
    ("hunyuan_video", 32, ax.MoRegConfig()),
])
def test_metric_and_moreg_on_the_video_stream_with_more_text_tokens(family, video_tokens, moreg):
    model, inputs = more_text_than_video(family)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, moreg=moreg))
    run_steps(cached, inputs, 4)
    assert cached.state()["p_prev_0"].shape[1] == video_tokens  # not the 64 text tokens
    assert cached.program().rewrite.frame_layout == (1, 2)
    rep = ax.report(cached)
    assert all(r["motion"] is not None for r in rep.steps if r.computed and r.step > 1)


def test_moreg_errors_say_what_to_do():
    model, make_inputs = build("pixart", num_layers=2)  # an image model with a convolutional patch embedding
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, moreg=ax.MoRegConfig()))
    with pytest.raises(ax.TransformError, match="MoReg is for video.*moreg=None"), torch.no_grad():
        cached(**make_inputs(0))
    model, make_inputs = build("ltx_video", num_layers=2)  # tokens packed by a linear layer
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=4, moreg=ax.MoRegConfig()))
    with pytest.raises(ax.TransformError, match=r"LTX-Video and Flux do\): set MoRegConfig\(frames=T\)"):
        with torch.no_grad():
            cached(**make_inputs(0))
