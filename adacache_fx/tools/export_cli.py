"""``adacache-fx export``: export a built-in model or a saved diffusers model to ONNX (and a TensorRT engine),
with stage timings.

A saved model (``--pretrained FOLDER [--subfolder transformer] [--dtype float16]``) is loaded with
``from_pretrained`` by the class its ``config.json`` names; its example inputs come from sizes
(``--batch --frames --height --width --text-length``: ``hidden_states``, ``timestep`` and
``encoder_hidden_states`` built from the config's channels and text width) or from a JSON file of
input shapes (``--inputs shapes.json``, see :func:`inputs_from_json`); the policy from a JSON file of a
config's ``to_dict`` (``--config policy.json``), else AdaCache with ``--steps`` and ``--codebook``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import time
from pathlib import Path

import torch

from .. import presets
from ..config import CacheConfig, config_from_dict
from ..policies import AdaCacheConfig
from ..state import dtype_from_name
from .fixtures import build

#: Built-in tiny random-weight models (``fixtures.build``), or the trained reference model.
MODEL_CHOICES = ["wan", "cogvideox", "latte", "reference"]


def build_model(name: str, num_layers: int = 4, seed: int = 0, weights=None) -> tuple[torch.nn.Module, dict]:
    """``(model, kwargs of one step)`` for a built-in tiny model or the trained ``reference`` model (from
    ``weights``, default the bundled ones)."""
    if name == "reference":
        from .reference import load_reference_model

        generator = torch.Generator().manual_seed(seed)
        transformer, caption_encoder = load_reference_model(weights)  # FileNotFoundError says how to get them
        with torch.no_grad():
            text = caption_encoder.encode_conditioning(["a large red circle moving right slow", ""])
        latents = torch.randn(2, 3, 8, 32, 32, generator=generator)  # conditional and unconditional (CFG)
        return transformer, {"hidden_states": latents, "timestep": torch.full((2,), 999.0), **text,
                             "return_dict": False}
    model, make_inputs = build(name, num_layers, seed=seed)
    return model, {**make_inputs(0), "return_dict": False}


#: Config keys that give the width of a diffusers transformer's text embeddings, in the order they are read.
TEXT_WIDTH_KEYS = ("text_dim", "text_embed_dim", "joint_attention_dim", "caption_channels", "cross_attention_dim")
LAYOUTS = ("BCFHW", "BFCHW", "BCHW")


def load_pretrained(path: str, subfolder: str | None = None, dtype: str = "float32",
                    class_name: str | None = None) -> torch.nn.Module:
    """A diffusers model saved with ``save_pretrained`` (a folder, or a subfolder of a pipeline's), loaded by the
    class its ``config.json`` names (``_class_name``) or ``class_name``, in ``dtype``, in eval mode."""
    import diffusers

    folder = Path(path) / (subfolder or "")
    config_file = folder / "config.json"
    if class_name is None:
        if not config_file.is_file():
            raise FileNotFoundError(
                f"no config.json in {folder}: give the folder save_pretrained wrote (and --subfolder, e.g. "
                "transformer, for a pipeline's), or the model class with --class"
            )
        class_name = json.loads(config_file.read_text()).get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"diffusers has no model class {class_name!r} (from {config_file}); name one with --class")
    model = cls.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype_from_name(dtype))
    return model.eval()


def _takes(model: torch.nn.Module, name: str) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def inputs_from_sizes(model: torch.nn.Module, batch: int = 1, frames: int | None = 2, height: int = 8,
                      width: int = 8, text_length: int = 8, layout: str = "BCFHW", text_dim: int | None = None,
                      timestep: float = 999.0, seed: int = 0, dtype: torch.dtype | None = None) -> dict:
    """The keyword inputs of one step of a diffusers transformer: random ``hidden_states`` of the config's
    ``in_channels`` in ``layout`` (``BCFHW``, ``BFCHW`` for CogVideoX-style latents, ``BCHW`` for images),
    ``timestep`` (batch,), random ``encoder_hidden_states`` (batch, text_length, width), with the width the
    first of the config's :data:`TEXT_WIDTH_KEYS` (or ``text_dim``), and ``return_dict=False``; floating
    tensors in ``dtype`` (default: the model's first parameter's). A model that
    needs other inputs (pooled projections, masks, ids) takes a shapes file (:func:`inputs_from_json`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    config, dtype = model.config, dtype or next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    channels = config.get("in_channels")
    if channels is None:
        raise ValueError(f"{type(model).__name__}'s config has no in_channels: give the input shapes in a JSON file (--inputs)")
    shape = {"BCFHW": (batch, channels, frames, height, width), "BFCHW": (batch, frames, channels, height, width),
             "BCHW": (batch, channels, height, width)}[layout]
    if None in shape:
        raise ValueError(f"layout {layout} needs --frames")
    inputs = {"hidden_states": torch.randn(shape, generator=generator).to(dtype),
              "timestep": torch.full((batch,), float(timestep))}
    if text_dim is None:
        text_dim = next((config[k] for k in TEXT_WIDTH_KEYS if isinstance(config.get(k), int)), None)
    if text_dim is not None and _takes(model, "encoder_hidden_states"):
        inputs["encoder_hidden_states"] = torch.randn(batch, text_length, text_dim, generator=generator).to(dtype)
    if _takes(model, "return_dict"):
        inputs["return_dict"] = False
    return inputs


def _dtype(name: str, input_name: str) -> torch.dtype:
    try:
        return dtype_from_name(name)
    except KeyError:
        raise ValueError(f"input {input_name!r}: unknown dtype {name!r} (float32, float16, int64, bool, ...)") from None


def inputs_from_json(spec: dict, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Keyword inputs from a JSON object, one entry per input of the forward:

    - a list of ints: a random normal tensor of that shape in the model's dtype;
    - ``{"shape": [...], "dtype": "int64", "fill": 1}``: a tensor of that shape and dtype (default the
      model's), filled with ``fill`` (random normal without one; an integer or bool tensor needs ``fill``);
    - anything else (a number, a bool, null, a string): passed as it is.

    ``return_dict`` defaults to false. E.g. ``{"hidden_states": [1, 2, 4, 8, 8], "timestep": {"shape": [1],
    "fill": 999}, "encoder_hidden_states": [1, 8, 16]}``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, value in spec.items():
        if isinstance(value, list) and all(isinstance(d, int) for d in value):
            inputs[name] = torch.randn(value, generator=generator).to(dtype)
        elif isinstance(value, dict) and "shape" in value:
            unknown = set(value) - {"shape", "dtype", "fill"}
            if unknown:
                raise ValueError(f"input {name!r}: unknown keys {sorted(unknown)} (shape, dtype, fill)")
            kind = _dtype(value["dtype"], name) if "dtype" in value else dtype
            if "fill" in value:
                inputs[name] = torch.full(value["shape"], value["fill"], dtype=kind)
            elif kind.is_floating_point:
                inputs[name] = torch.randn(value["shape"], generator=generator).to(kind)
            else:
                raise ValueError(f"input {name!r}: a {value['dtype']} tensor needs a \"fill\" value")
        else:
            inputs[name] = value
    inputs.setdefault("return_dict", False)
    return inputs


def policy_config(args: argparse.Namespace) -> CacheConfig:
    """The policy of ``--config FILE`` (a config's ``to_dict``, N from ``--steps`` if it has none), else AdaCache
    with ``--steps`` and ``--codebook``."""
    if args.config is None:
        return AdaCacheConfig(num_steps=args.steps, codebook=presets.PRESETS[args.codebook])
    config = config_from_dict(json.loads(Path(args.config).read_text()))
    return config if config.num_steps is not None else dataclasses.replace(config, num_steps=args.steps)


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand's options to ``parser`` (run it with :func:`cli_export`)."""
    parser.add_argument("--model", choices=MODEL_CHOICES, default="wan",
                        help="a built-in tiny random-weight model, or the trained reference model")
    own = parser.add_argument_group("a saved diffusers model (instead of --model)")
    own.add_argument("--pretrained", default=None, help="folder written by save_pretrained (or a pipeline's)")
    own.add_argument("--subfolder", default=None, help="the model's subfolder of a pipeline folder (transformer)")
    own.add_argument("--class", dest="model_class", default=None, help="diffusers model class (default: config.json's)")
    own.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    own.add_argument("--inputs", default=None, help="JSON file of example-input shapes (instead of the sizes)")
    own.add_argument("--batch", type=int, default=1)
    own.add_argument("--frames", type=int, default=2, help="latent frames")
    own.add_argument("--height", type=int, default=8, help="latent height")
    own.add_argument("--width", type=int, default=8, help="latent width")
    own.add_argument("--text-length", type=int, default=8, help="tokens of encoder_hidden_states")
    own.add_argument("--text-dim", type=int, default=None, help="width of encoder_hidden_states (default: config's)")
    own.add_argument("--layout", choices=LAYOUTS, default="BCFHW", help="hidden_states layout (CogVideoX: BFCHW)")
    parser.add_argument("--config", default=None,
                        help="JSON file of the policy config (a config's to_dict; default AdaCache with --codebook)")
    parser.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    parser.add_argument("--out", default=None, help="output file (default: adacache_<model>.onnx or .engine)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps N (default 30)")
    parser.add_argument("--codebook", choices=sorted(presets.PRESETS), default="fast")
    parser.add_argument("--layers", type=int, default=4, help="blocks of a built-in model (default 4)")
    parser.add_argument("--weights", default=None, help="reference model: folder of its weights (default: bundled)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--external-data", action="store_true", help="store the weights in a separate file")
    parser.add_argument("--fp16", action="store_true", help="TensorRT: allow FP16 kernels")
    parser.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace (GiB)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip running one step with ONNX Runtime against torch")
    return parser


def cli_export(args: argparse.Namespace) -> int:
    """Export ``args.model`` transformed with AdaCache; prints one line per stage with its duration."""
    import adacache_fx as ax

    from ..export import ExportValidationError, OnnxRunner, to_onnx

    def line(stage: str, seconds: float) -> None:
        print(f"  {stage:<28s} {seconds:7.2f} s", flush=True)

    start = time.perf_counter()
    try:
        if args.format == "tensorrt":
            from ..export.tensorrt import require_tensorrt

            require_tensorrt()  # before the slow stages
        config = policy_config(args)
        if args.pretrained is not None:
            name = Path(args.pretrained).name or "model"
            model = load_pretrained(args.pretrained, args.subfolder, args.dtype, args.model_class)
            line("load model", time.perf_counter() - start)
            dtype = dtype_from_name(args.dtype)  # a model may keep some modules in float32 (_keep_in_fp32_modules)
            if args.inputs is not None:
                call = inputs_from_json(json.loads(Path(args.inputs).read_text()), dtype)
            else:
                call = inputs_from_sizes(model, args.batch, args.frames, args.height, args.width, args.text_length,
                                         args.layout, args.text_dim, dtype=dtype)
        else:
            name = args.model
            model, call = build_model(args.model, args.layers, weights=args.weights)
            line("build model", time.perf_counter() - start)
    except (FileNotFoundError, RuntimeError, ValueError, TypeError) as error:
        print(f"adacache-fx export: {error}")
        return 2
    cached = ax.transform(model, config)
    suffix = ".onnx" if args.format == "onnx" else ".engine"
    out = Path(args.out or f"adacache_{name}{suffix}")
    onnx_path = out if args.format == "onnx" else out.with_suffix(".onnx")
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in call.items() if isinstance(v, torch.Tensor))
    policy = f"codebook {args.codebook}" if args.config is None else f"{type(config).__name__} from {args.config}"
    print(f"exporting {name} ({type(model).__name__}, {config.num_steps} steps, {policy}; {shapes}) to {onnx_path}")
    target = "tensorrt" if args.format == "tensorrt" else None
    try:
        info = to_onnx(cached, call, onnx_path, opset=args.opset, external_data=args.external_data or None,
                       progress=line, target=target)
    except ExportValidationError as error:  # names the op, the module and line, and what to do
        print(f"adacache-fx export: {error}")
        return 1
    print(f"  {info.num_if_nodes} If node(s) for regions {info.metadata['regions']}; state {info.state_names}")
    rewritten = [summary for summary in info.prepared.values() if not summary.startswith("0 ")]
    print(f"  prepared for ONNX: {'; '.join(rewritten) or 'nothing to rewrite'}; checked: {', '.join(info.validated)}")
    if args.verify:
        started = time.perf_counter()
        runner = OnnxRunner(onnx_path)
        got = runner(**call)[0]
        with torch.no_grad():
            ax.reset(cached)
            expected = cached(**call)[0]
        line("ORT session + one step", time.perf_counter() - started)
        error = float((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12))
        print(f"  ONNX Runtime vs torch, first step: max relative error {error:.2e}")
    if args.format == "tensorrt":
        from ..export.tensorrt import build_tensorrt_engine

        started = time.perf_counter()
        build_tensorrt_engine(onnx_path, out, fp16=args.fp16, workspace_gb=args.workspace_gb)
        line("TensorRT engine build", time.perf_counter() - started)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the export command alone: ``python -m adacache_fx.tools.export_cli --model wan ...``."""
    return cli_export(add_export_arguments(argparse.ArgumentParser(prog="adacache-fx export")).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
