"""Synthetic reference data, tokenizer and the caption-faithfulness check (fast, no model)."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch

from adacache_fx.tools.reference import (
    COLOURS,
    DIRECTIONS,
    MAX_CAPTION_LEN,
    SHAPES,
    SIZES,
    VOCAB,
    Caption,
    check_clip,
    check_clips,
    decode_tokens,
    encode_captions,
    evaluation_captions,
    parse_caption,
    render_clip,
    sample_batch,
    sample_caption,
)


def test_sample_batch_is_deterministic_and_well_formed():
    clips_a, caps_a = sample_batch(np.random.default_rng(7), 6)
    clips_b, caps_b = sample_batch(np.random.default_rng(7), 6)
    clips_c, _ = sample_batch(np.random.default_rng(8), 6)
    assert caps_a == caps_b
    assert torch.equal(clips_a, clips_b)
    assert not torch.equal(clips_a, clips_c)
    assert clips_a.shape == (6, 3, 8, 32, 32)
    assert clips_a.dtype == torch.float32
    assert clips_a.min() >= -1.0
    assert clips_a.max() <= 1.0
    # dark background dominates, the object reaches full brightness in its brightest channel
    assert clips_a.median() == pytest.approx(-0.9)
    assert torch.allclose(clips_a.amax(dim=(1, 2, 3, 4)), torch.ones(6))


def test_every_caption_round_trips_through_text_and_tokens():
    captions = [Caption(s, c, z, None, "still") for s, c, z in itertools.product(SHAPES, COLOURS, SIZES)]
    captions += [
        Caption(s, c, z, d, v)
        for s, c, z, d, v in itertools.product(SHAPES, COLOURS, SIZES, DIRECTIONS, ("slow", "fast"))
    ]
    assert len(captions) == 3 * 6 * 2 * (1 + 4 * 2)
    texts = [c.text for c in captions]
    assert texts[0] == "a small red circle staying still"
    assert "a large blue square moving left fast" in texts
    assert [parse_caption(t) for t in texts] == captions
    assert decode_tokens(encode_captions(texts)) == texts


def test_invalid_captions_are_rejected():
    with pytest.raises(ValueError, match="unknown direction"):
        parse_caption("a large red circle moving sideways fast")
    with pytest.raises(ValueError, match="outside the grammar"):
        parse_caption("a red circle")
    with pytest.raises(ValueError, match="no direction"):
        Caption("circle", "red", "large", "left", "still")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode_captions(["a large purple circle"])


def test_tokenizer_shapes_and_padding():
    ids = encode_captions(["a large red circle moving left fast", "a small blue square staying still", ""])
    assert ids.shape == (3, MAX_CAPTION_LEN)
    assert ids.dtype == torch.long
    w = VOCAB.index
    assert ids[0].tolist() == [
        w("a"),
        w("large"),
        w("red"),
        w("circle"),
        w("moving"),
        w("left"),
        w("fast"),
        0,
    ]
    assert ids[1, 6:].tolist() == [0, 0]
    assert (ids[1, :6] > 0).all()
    assert ids[2].tolist() == [0] * MAX_CAPTION_LEN  # unconditional input for CFG
    assert VOCAB[0] == "<pad>"
    assert encode_captions(["a small red circle"], max_len=12).shape == (1, 12)


def test_check_agrees_with_ground_truth():
    rng = np.random.default_rng(0)
    captions = [sample_caption(rng) for _ in range(60)]
    clips = torch.stack([render_clip(c, rng) for c in captions])
    rates = check_clips(clips, captions)
    assert rates == dict.fromkeys(rates, 1.0)


def test_evaluation_set_covers_every_direction_and_speed():
    captions = evaluation_captions()
    assert len(captions) == 48
    assert captions == evaluation_captions()  # fixed
    motion = Counter((c.direction, c.speed) for c in captions)
    assert motion == {(None, "still"): 16} | {(d, s): 4 for d in DIRECTIONS for s in ("slow", "fast")}
    assert Counter(c.shape for c in captions) == dict.fromkeys(SHAPES, 16)
    assert Counter(c.colour for c in captions) == dict.fromkeys(COLOURS, 8)
    assert Counter(c.size for c in captions) == dict.fromkeys(SIZES, 24)
    assert len({c.shape for c in captions if c.speed == "fast"}) == 3  # attributes are not tied to motion
    assert [parse_caption(c.text) for c in captions] == captions
    assert len(evaluation_captions(repeats=1)) == 12


def test_check_passes_on_ground_truth_of_the_evaluation_set():
    rng = np.random.default_rng(4)
    captions = evaluation_captions()
    clips = torch.stack([render_clip(c, rng) for c in captions])
    assert check_clips(clips, captions) == dict.fromkeys(
        ("ok", "direction_ok", "speed_ok", "colour_ok", "size_ok", "shape_ok", "visible"), 1.0
    )
    # a clip played backwards moves the opposite way: the check must notice
    flipped = check_clips(clips.flip(2), captions)
    assert flipped["direction_ok"] == pytest.approx(16 / 48)  # only the still clips pass
    assert flipped["speed_ok"] == 1.0


def test_measured_speeds():
    rng = np.random.default_rng(1)
    speeds = {"still": [], "slow": [], "fast": []}
    for speed, direction in itertools.product(speeds, DIRECTIONS):
        cap = Caption("square", "white", "large", None if speed == "still" else direction, speed)
        result = check_clip(render_clip(cap, rng), cap)
        assert result.ok
        speeds[speed].append(result.speed_px)
        assert result.jitter_px < 0.1
        if speed != "still":
            assert result.direction == direction
    assert max(speeds["still"]) < 1e-3
    assert min(speeds["slow"]) > 0.9
    assert max(speeds["slow"]) <= 1.0 + 1e-3
    assert min(speeds["fast"]) > 2.9
    assert max(speeds["fast"]) <= 3.0 + 1e-3
    assert min(speeds["fast"]) > 2.5 * max(speeds["slow"])


def test_check_reports_mismatches_and_missing_objects():
    rng = np.random.default_rng(2)
    truth = Caption("circle", "green", "small", "up", "fast")
    clip = render_clip(truth, rng)
    wrong = check_clip(clip, Caption("circle", "red", "small", "down", "slow"))
    assert not wrong.colour_ok
    assert not wrong.direction_ok
    assert not wrong.speed_ok
    assert not wrong.ok
    assert wrong.colour == "green"
    assert wrong.direction == "up"
    assert wrong.speed == "fast"
    blank = check_clip(torch.full((3, 8, 32, 32), -0.9), truth)
    assert blank.visible_frames == 0
    assert not blank.ok
    assert blank.direction is None


def test_check_tolerates_mild_noise():
    rng = np.random.default_rng(3)
    gen = torch.Generator().manual_seed(0)
    captions = [sample_caption(rng) for _ in range(12)]
    clips = torch.stack([render_clip(c, rng) for c in captions])
    noisy = (clips + 0.05 * torch.randn(clips.shape, generator=gen)).clamp(-1, 1)
    assert check_clips(noisy, captions)["ok"] == 1.0


def test_reference_model_runs_and_round_trips_through_safetensors(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from adacache_fx.tools.reference import (
        build_reference_model,
        load_reference_model,
        save_reference_model,
    )
    from adacache_fx.tools.reference.pipeline import ReferencePipeline

    torch.manual_seed(0)
    transformer, encoder = build_reference_model()
    x = torch.randn(2, 3, 8, 32, 32)
    context = encoder.encode(["a large red circle moving left fast", ""])
    assert context.shape == (2, 8, 64)
    assert torch.count_nonzero(context[1]) == 0  # empty caption -> all-zero context
    with torch.no_grad():
        out_float = transformer(x, torch.tensor([500.0, 20.5]), context, return_dict=False)[0]
        out_int = transformer(x, torch.tensor([500, 20]), context, return_dict=False)[0]
    assert out_float.shape == out_int.shape == x.shape
    assert torch.isfinite(out_float).all()
    assert torch.isfinite(out_int).all()

    save_reference_model(transformer, encoder, tmp_path)
    assert not list(tmp_path.glob("*.pt"))
    assert (tmp_path / "transformer.safetensors").is_file()
    transformer2, encoder2 = load_reference_model(tmp_path)
    with torch.no_grad():
        out2 = transformer2(
            x, torch.tensor([500.0, 20.5]), encoder2.encode(["a large red circle moving left fast", ""])
        )
    assert torch.allclose(out2.sample, out_float, atol=1e-6)
    pipe = ReferencePipeline(transformer2, encoder2, FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a small blue square staying still", num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 8, 3, 32, 32)  # [B, T, C, H, W]
    assert 0.0 <= frames.min() <= frames.max() <= 1.0
    with pytest.raises(FileNotFoundError):
        load_reference_model(tmp_path / "missing")


def test_hunyuan_family_takes_the_pooled_caption_and_round_trips(tmp_path):
    from adacache_fx.tools.reference import build_reference_model, load_reference_model, save_reference_model

    torch.manual_seed(0)
    transformer, encoder = build_reference_model("hunyuan")
    assert type(transformer).__name__ == "HunyuanVideoTransformer3DModel"
    cond = encoder.encode_conditioning(["a large red circle moving left fast", ""])
    assert cond["pooled_projections"].shape == (2, 64)
    assert torch.count_nonzero(cond["pooled_projections"][1]) == 0  # empty caption: zero pooled vector
    assert cond["encoder_attention_mask"].tolist() == [[1.0] * 7 + [0.0], [1.0] + [0.0] * 7]  # 7 words
    x = torch.randn(2, 3, 8, 32, 32)
    t = torch.tensor([500.0, 20.5])
    with torch.no_grad():
        out = transformer(x, t, **cond, return_dict=False)[0]
        # the pooled path alone changes the output: same tokens, another pooled vector
        swapped = cond | {"pooled_projections": cond["pooled_projections"].flip(0)}
        out_swapped = transformer(x, t, **swapped, return_dict=False)[0]
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out - out_swapped).abs().max() > 1e-4
    save_reference_model(transformer, encoder, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["family"] == "hunyuan"
    transformer2, encoder2 = load_reference_model(tmp_path)
    with torch.no_grad():
        out2 = transformer2(x, t, **encoder2.encode_conditioning(["a large red circle moving left fast", ""]),
                            return_dict=False)[0]
    assert torch.equal(out2, out)
    with pytest.raises(ValueError, match="unknown reference family"):
        build_reference_model("flux")


def test_describe_reference_model_names_class_and_blocks():
    from adacache_fx.tools.reference import build_reference_model, describe_reference_model

    wan, _ = build_reference_model()
    hunyuan, _ = build_reference_model("hunyuan", num_single_layers=8)
    assert describe_reference_model(wan) == "WanTransformer3DModel, 6 blocks"
    assert describe_reference_model(hunyuan) == "HunyuanVideoTransformer3DModel, 2 + 8 single-stream blocks"


def test_weights_label_names_the_folder_the_model_and_the_weights_digest(tmp_path):
    import hashlib

    from adacache_fx.tools.reference import WEIGHTS_DIR, build_reference_model, save_reference_model, weights_label

    torch.manual_seed(0)
    model, encoder = build_reference_model("hunyuan")
    save_reference_model(model, encoder, tmp_path)
    digest = hashlib.sha256((tmp_path / "transformer.safetensors").read_bytes()).hexdigest()[:12]
    label = weights_label(str(tmp_path), model)
    assert label == f"{tmp_path} (HunyuanVideoTransformer3DModel, 2 + 4 single-stream blocks, sha256 {digest})"
    bundled = hashlib.sha256((WEIGHTS_DIR / "transformer.safetensors").read_bytes()).hexdigest()[:12]
    assert weights_label(None, model).startswith("bundled (") and bundled in weights_label(None, model)


def test_shape_mix_draws_shapes_in_proportion_and_keeps_the_uniform_stream():
    rng = np.random.default_rng(3)
    assert [sample_caption(rng).text for _ in range(4)] == [  # no mix: the draws of the code before the option
        "a small green circle moving left fast", "a small red square moving down fast",
        "a small yellow square staying still", "a large white circle staying still",
    ]
    rng = np.random.default_rng(0)
    counts = Counter(sample_caption(rng, (1, 2, 1)).shape for _ in range(4000))
    assert counts["square"] / 4000 == pytest.approx(0.5, abs=0.03)
    assert counts["circle"] / 4000 == pytest.approx(0.25, abs=0.03)
    _, captions = sample_batch(np.random.default_rng(1), 8, (0, 1, 0))
    assert {c.shape for c in captions} == {"square"}
    for bad in ((1, 1), (1, -1, 1), (0, 0, 0), (1, float("nan"), 1)):
        with pytest.raises(ValueError, match="one non-negative weight per shape"):
            sample_caption(rng, bad)
