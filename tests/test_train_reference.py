"""examples/train_reference.py: noise-level sampling, chunked resumption and export (tiny settings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_reference.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shifted_logit_normal_t(train):
    gen = torch.Generator().manual_seed(0)
    plain = train.sample_t(100_000, 1.0, gen)
    shifted = train.sample_t(100_000, 2.5, gen)
    assert 0 < float(shifted.min()) and float(shifted.max()) < 1
    assert float(plain.median()) == pytest.approx(0.5, abs=0.01)
    assert float(shifted.median()) == pytest.approx(2.5 / 3.5, abs=0.01)  # s u / (1 + (s - 1) u) at u = 1/2
    assert float((shifted > 0.9).float().mean()) > 5 * float((plain > 0.9).float().mean())


def test_resumed_chunks_equal_one_run_and_export(train, tmp_path):
    tiny = ["--threads", "1", "--batch-size", "2", "--eval-repeats", "1", "--sample-steps", "1"]
    train.main([*tiny, "--out", str(tmp_path / "one"), "--steps", "3", "--eval-every", "0"])
    train.main([*tiny, "--out", str(tmp_path / "two"), "--steps", "2", "--eval-every", "2"])
    first = tmp_path / "two" / "checkpoint.pt"
    train.main([*tiny, "--out", str(tmp_path / "two"), "--steps", "3", "--resume", str(first), "--eval-every", "0"])
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert one["step"] == two["step"] == 3
    assert torch.equal(one["losses"], two["losses"])
    for key in ("transformer", "ema_transformer", "caption_encoder"):
        assert all(torch.equal(one[key][k], two[key][k]) for k in one[key])
    assert one["optimizer"]["state"][0]["step"] == two["optimizer"]["state"][0]["step"] == 3
    assert two["scheduler"]["last_epoch"] == 3
    assert two["cpu_s"] > 0
    csv_lines = (tmp_path / "two" / "eval.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,train_min,loss_ema,ok,direction_ok")
    assert [line.split(",")[0] for line in csv_lines[1:]] == ["0", "2"]
    assert (tmp_path / "two" / "checkpoint_00002.pt").is_file()

    export_dir = tmp_path / "export"
    train.main([*tiny, "--resume", str(tmp_path / "two" / "checkpoint.pt"), "--export-only", "--export-dir", str(export_dir)])
    names = {p.name for p in export_dir.iterdir()}
    assert {"transformer.safetensors", "caption_encoder.safetensors", "config.json", "README.md"} <= names
    assert {"loss_curve.png", "samples.png", "caption_check.png"} <= names
    config = json.loads((export_dir / "config.json").read_text())
    assert config["training"]["steps"] == 3
    assert config["caption_check"]["step"] == 3
    assert "| 2 | 0 |" in (export_dir / "README.md").read_text()  # learning-curve row of the step-2 evaluation
    from adacache_fx.tools.reference import load_reference_model

    transformer, _ = load_reference_model(export_dir)
    assert torch.equal(transformer.state_dict()["proj_out.weight"], two["ema_transformer"]["proj_out.weight"])


def test_single_layers_grow_init_weights_by_identity_blocks(train, tmp_path):
    """``--single-layers 6`` from 4-block weights: the grown model computes exactly what the init did (the
    appended blocks add a zero residual), a training step then moves the new blocks, and the export's config
    and card name 6 blocks, so ``load_reference_model`` rebuilds it."""
    from adacache_fx.tools.reference import build_reference_model, load_reference_model, save_reference_model

    torch.manual_seed(0)
    small, encoder = build_reference_model("hunyuan")
    save_reference_model(small, encoder, tmp_path / "init")
    args = train.parse_args(["--family", "hunyuan", "--init", str(tmp_path / "init"), "--single-layers", "6",
                             "--batch-size", "2", "--threads", "1"])
    run = train.Run({k: getattr(args, k) for k in train.HYPER} | {"steps": 1})
    assert len(run.transformer.single_transformer_blocks) == 6 and run.grown_from == 4
    x = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700.0, 30.0])
    cond = encoder.encode_conditioning(["a large red circle moving left fast", ""])
    with torch.no_grad():
        assert torch.equal(run.transformer.eval()(x, t, **cond, return_dict=False)[0],
                           small(x, t, **cond, return_dict=False)[0])
    run.transformer.train()
    run.train_step()
    assert run.transformer.single_transformer_blocks[5].proj_out.weight.abs().max() > 0
    train.main(["--threads", "1", "--batch-size", "2", "--eval-repeats", "1", "--sample-steps", "1",
                "--init", str(tmp_path / "init"), "--single-layers", "6", "--steps", "1", "--eval-every", "0",
                "--out", str(tmp_path / "run"), "--export", "--export-dir", str(tmp_path / "grown")])
    config = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert config["transformer"]["num_single_layers"] == 6
    assert config["training"]["grown_from_single_layers"] == 4
    assert "grown from 4 to 6 single-stream blocks" in (tmp_path / "grown" / "README.md").read_text()
    assert len(load_reference_model(tmp_path / "grown")[0].single_transformer_blocks) == 6

    with pytest.raises(ValueError, match="fewer than the 4 blocks"):
        args = train.parse_args(["--family", "hunyuan", "--init", str(tmp_path / "init"), "--single-layers", "2"])
        train.Run({k: getattr(args, k) for k in train.HYPER} | {"steps": 1})
    with pytest.raises(ValueError, match="no setting"):
        build_reference_model("wan", num_single_layers=2)


def test_eval_only_prints_the_check_of_init_weights_with_their_family(train, tmp_path, capsys):
    from adacache_fx.tools.reference import build_reference_model, save_reference_model

    torch.manual_seed(0)
    save_reference_model(*build_reference_model("hunyuan", num_single_layers=5), tmp_path / "w")
    train.main(["--threads", "1", "--init", str(tmp_path / "w"), "--eval-only", "--eval-repeats", "1",
                "--sample-steps", "1", "--guidance-scale", "5"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["guidance_scale"] == 5.0 and line["sample_steps"] == 1
    assert {"ok", "shape_ok", "ok_still", "ok_fast", "shape_ok_circle", "shape_ok_triangle"} <= set(line)
    assert all(0.0 <= line[f"shape_ok_{s}"] <= 1.0 for s in ("circle", "square", "triangle"))  # no NaN
    assert not (tmp_path / "w" / "checkpoint.pt").exists()
    with pytest.raises(SystemExit):
        train.parse_args(["--eval-only"])


def test_object_weights_cover_the_object_and_its_edge(train):
    from adacache_fx.tools.reference.data import BACKGROUND

    clips = torch.full((1, 3, 2, 9, 9), BACKGROUND)
    clips[0, 0, 0, 4, 4] = 1.0  # one red pixel in frame 0 only
    w = train.object_weights(clips, 4.0)
    assert w.shape == (1, 1, 2, 9, 9)
    assert torch.all(w[0, 0, 0, 2:7, 2:7] == 5.0)  # the pixel and 2 pixels around it
    assert float(w[0, 0, 0].sum()) == 25 * 5.0 + (81 - 25) * 1.0
    assert torch.all(w[0, 0, 1] == 1.0)  # frames are weighted on their own
    pred, target = torch.zeros_like(clips), torch.zeros_like(clips)
    pred[0, :, 0, 0, 0] = 1.0  # error on the background only
    plain = train.flow_loss(pred, target, clips, 0.0)
    assert float(plain) == pytest.approx(3 / clips.numel())
    assert float(train.flow_loss(pred, target, clips, 4.0)) == pytest.approx(3 / float(w.sum() * 3))


def test_patch_size_of_a_new_model_and_a_clear_error_against_init_weights(train, tmp_path):
    from adacache_fx.tools.reference import build_reference_model, load_reference_model, save_reference_model

    train.main(["--threads", "1", "--batch-size", "2", "--eval-repeats", "1", "--sample-steps", "1",
                "--family", "hunyuan", "--patch-size", "8", "--steps", "1", "--eval-every", "0",
                "--out", str(tmp_path / "run"), "--export", "--export-dir", str(tmp_path / "p8")])
    config = json.loads((tmp_path / "p8" / "config.json").read_text())
    assert config["transformer"]["patch_size"] == 8 and config["family"] == "hunyuan"
    assert "patchified 1x8x8 into 128 tokens" in (tmp_path / "p8" / "README.md").read_text()
    assert load_reference_model(tmp_path / "p8")[0].config.patch_size == 8
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert json.loads(ckpt["hyper"])["patch_size"] == 8  # a resumed run rebuilds the same model

    torch.manual_seed(0)
    save_reference_model(*build_reference_model("hunyuan"), tmp_path / "init")
    with pytest.raises(SystemExit, match="patch size 4"):
        train.main(["--threads", "1", "--init", str(tmp_path / "init"), "--patch-size", "2", "--steps", "1",
                    "--out", str(tmp_path / "bad")])
    assert train.spatial_patch((1, 4, 4), 2) == (1, 2, 2) and train.spatial_patch([1, 4, 4]) == 4  # Wan's form
    assert train.spatial_patch(4, 2) == 2 and train.spatial_patch(None) is None


def test_evaluate_groups_the_shape_check_by_captioned_shape(train, monkeypatch):
    """Ground-truth clips, squares drawn as circles: every check passes except shape on the square captions."""
    import dataclasses

    import numpy as np

    from adacache_fx.tools.reference import render_clip

    def drawn(_t, _e, captions, _steps, _g, seed):
        rng = np.random.default_rng(seed)
        wrong = [dataclasses.replace(c, shape="circle") if c.shape == "square" else c for c in captions]
        return torch.stack([render_clip(c, rng) for c in wrong])

    monkeypatch.setattr(train, "sample", drawn)
    args = train.parse_args(["--eval-repeats", "1"])
    rates = train.evaluate(torch.nn.Linear(1, 1), None, args)
    assert (rates["shape_ok_circle"], rates["shape_ok_square"], rates["shape_ok_triangle"]) == (1.0, 0.0, 1.0)
    assert rates["shape_ok"] == pytest.approx(2 / 3) and rates["ok"] == 1.0
    assert rates["ok_still"] == rates["ok_slow"] == rates["ok_fast"] == 1.0


def test_shape_mix_reaches_the_training_batches_checkpoint_and_card(train, tmp_path, monkeypatch):
    drawn = []
    sample_batch = train.ref.sample_batch

    def recording(rng, batch_size, shape_mix=None):
        clips, captions = sample_batch(rng, batch_size, shape_mix)
        drawn.extend(c.shape for c in captions)
        return clips, captions

    monkeypatch.setattr(train.ref, "sample_batch", recording)
    train.main(["--threads", "1", "--batch-size", "4", "--eval-repeats", "1", "--sample-steps", "1",
                "--family", "hunyuan", "--patch-size", "8", "--steps", "2", "--eval-every", "0",
                "--shape-mix", "0,1,0", "--out", str(tmp_path / "run"), "--export", "--export-dir", str(tmp_path / "w")])
    assert drawn == ["square"] * 8
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert json.loads(ckpt["hyper"])["shape_mix"] == [0.0, 1.0, 0.0]
    assert "drew the shapes circle 0%, square 100%, triangle 0%" in (tmp_path / "w" / "README.md").read_text()
    assert json.loads((tmp_path / "w" / "config.json").read_text())["training"]["shape_mix"] == [0.0, 1.0, 0.0]
    with pytest.raises(SystemExit):
        train.parse_args(["--shape-mix", "1,2"])
