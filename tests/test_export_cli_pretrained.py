"""``adacache-fx export --pretrained``: a user's own diffusers model saved with save_pretrained, offline, with
input sizes or a JSON file of input shapes and the policy config as JSON; Wan and CogVideoX."""

import argparse
import contextlib
import io
import json
import re

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

import adacache_fx as ax
from adacache_fx.config import config_from_dict
from adacache_fx.export import OnnxRunner, read_metadata
from adacache_fx.tools.export_cli import add_export_arguments, cli_export, inputs_from_json, inputs_from_sizes
from adacache_fx.tools.fixtures import build

STEPS = 8
POLICY = ax.AdaCacheConfig(num_steps=STEPS, codebook={0.25: 3, 0.45: 2, 1.0: 1}, granularity="block")


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_export(add_export_arguments(argparse.ArgumentParser()).parse_args(list(argv)))
    return code, out.getvalue()


def _first_step_error(output: str) -> float:
    return float(re.search(r"max relative error ([0-9.e+-]+)", output).group(1))


def _drift(inputs: dict, step: int) -> dict:
    """The CLI's example inputs a denoising step later: the latents moved, the timestep lower."""
    latents = inputs["hidden_states"]
    direction = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7)).to(latents.dtype)
    return {**inputs, "hidden_states": latents + 0.02 * step * direction,
            "timestep": inputs["timestep"] - 33 * step}


def test_saved_wan_from_sizes_and_a_policy_file(tmp_path):
    wan, _ = build("wan", num_layers=2)
    wan.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "policy.json").write_text(json.dumps(POLICY.to_dict()))
    out = tmp_path / "wan.onnx"
    code, output = _cli("--pretrained", str(tmp_path / "pipe"), "--subfolder", "transformer", "--frames", "2",
                        "--height", "8", "--width", "8", "--text-length", "8", "--config",
                        str(tmp_path / "policy.json"), "--out", str(out))
    assert code == 0, output
    assert "WanTransformer3DModel" in output and "AdaCacheConfig from" in output
    assert "prepared for ONNX: nothing to rewrite; checked: onnx.checker, shape inference, onnxruntime" in output
    assert _first_step_error(output) < 1e-5
    metadata = read_metadata(out)
    assert config_from_dict(metadata["config"]) == POLICY
    shapes = {item["name"]: item.get("shape") for item in metadata["inputs"]}
    assert shapes["hidden_states"] == [1, 4, 2, 8, 8] and shapes["encoder_hidden_states"] == [1, 8, 16]

    # a whole generation in ONNX Runtime equals the saved model loaded and transformed in torch
    model = WanTransformer3DModel.from_pretrained(tmp_path / "pipe", subfolder="transformer").eval()
    inputs = inputs_from_sizes(model, 1, 2, 8, 8, 8)
    cached, runner = ax.transform(model, POLICY), OnnxRunner(out)
    with torch.no_grad():
        for s in range(STEPS):
            expected, got = cached(**_drift(inputs, s))[0], runner(**_drift(inputs, s))[0]
            assert float((got - expected).abs().max()) < 1e-5, f"step {s + 1}"
    assert runner.report().computed_steps == ax.report(cached).computed_steps
    assert 2 < ax.report(cached).num_computed < STEPS


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_saved_cogvideox_from_a_shapes_file(tmp_path, dtype):
    cog, _ = build("cogvideox", num_layers=2)
    cog.save_pretrained(tmp_path / "cog")
    shapes = {"hidden_states": [1, 2, 4, 8, 8], "timestep": {"shape": [1], "dtype": "int64", "fill": 999},
              "encoder_hidden_states": [1, 8, 16]}
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))
    out = tmp_path / "cog.onnx"
    code, output = _cli("--pretrained", str(tmp_path / "cog"), "--dtype", dtype, "--inputs",
                        str(tmp_path / "shapes.json"), "--steps", str(STEPS), "--codebook", "slow", "--out", str(out))
    assert code == 0, output
    assert "CogVideoXTransformer3DModel" in output and "codebook slow" in output
    assert _first_step_error(output) < (1e-5 if dtype == "float32" else 5e-3)
    metadata = read_metadata(out)
    assert metadata["num_steps"] == STEPS and metadata["config"]["codebook"] == [[k, v] for k, v in ax.presets.SLOW_30.items()]
    entries = {item["name"]: item for item in metadata["inputs"]}
    assert (entries["hidden_states"]["dtype"], entries["timestep"]["dtype"]) == (dtype, "int64")
    assert entries["encoder_hidden_states"]["shape"] == [1, 8, 16]
    model = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "cog", torch_dtype=getattr(torch, dtype))
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    inputs = inputs_from_json(shapes, getattr(torch, dtype))
    with torch.no_grad():
        expected = ax.transform(model.eval(), ax.AdaCacheConfig(num_steps=STEPS))(**inputs)[0]
    got = OnnxRunner(out)(**inputs)[0]  # the same seeded inputs as the CLI's
    assert float((got.float() - expected.float()).abs().max() / expected.float().abs().max()) < 5e-3


def test_saved_model_errors_say_what_to_give(tmp_path):
    code, output = _cli("--pretrained", str(tmp_path), "--out", str(tmp_path / "x.onnx"))
    assert code == 2 and "no config.json" in output and "--subfolder" in output
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "NotAModel"}))
    code, output = _cli("--pretrained", str(tmp_path), "--out", str(tmp_path / "x.onnx"))
    assert code == 2 and "diffusers has no model class 'NotAModel'" in output and "--class" in output
    with pytest.raises(ValueError, match="'mask': a int64 tensor needs a \"fill\" value"):
        inputs_from_json({"mask": {"shape": [1, 8], "dtype": "int64"}})
    assert not (tmp_path / "x.onnx").exists()


def test_saved_model_in_bfloat16_says_which_op_and_what_to_do(tmp_path):
    wan, _ = build("wan", num_layers=2)
    wan.save_pretrained(tmp_path / "wan")
    code, output = _cli("--pretrained", str(tmp_path / "wan"), "--dtype", "bfloat16", "--steps", str(STEPS),
                        "--out", str(tmp_path / "wan.onnx"))
    assert code == 1
    assert "fails shape inference at Conv node" in output and "in module patch_embedding (Conv3d)" in output
    assert "tensor(bfloat16)" in output and "What to do:" in output and "float32 or float16" in output
