"""``adacache-fx export``: export a built-in model to ONNX (and a TensorRT engine), with stage timings."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import presets
from ..policies import AdaCacheConfig
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
            text = caption_encoder.encode(["a red circle moving right slowly", ""])
        latents = torch.randn(2, 3, 8, 32, 32, generator=generator)  # conditional and unconditional (CFG)
        return transformer, {"hidden_states": latents, "timestep": torch.full((2,), 999.0),
                             "encoder_hidden_states": text, "return_dict": False}
    model, make_inputs = build(name, num_layers, seed=seed)
    return model, {**make_inputs(0), "return_dict": False}


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand's options to ``parser`` (run it with :func:`cli_export`)."""
    parser.add_argument("--model", choices=MODEL_CHOICES, default="wan",
                        help="a built-in tiny random-weight model, or the trained reference model")
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

    from ..export import OnnxRunner, to_onnx

    def line(stage: str, seconds: float) -> None:
        print(f"  {stage:<28s} {seconds:7.2f} s", flush=True)

    start = time.perf_counter()
    try:
        if args.format == "tensorrt":
            from ..export.tensorrt import require_tensorrt

            require_tensorrt()  # before the slow stages
        model, call = build_model(args.model, args.layers, weights=args.weights)
    except (FileNotFoundError, RuntimeError) as error:
        print(f"adacache-fx export: {error}")
        return 2
    line("build model", time.perf_counter() - start)
    config = AdaCacheConfig(num_steps=args.steps, codebook=presets.PRESETS[args.codebook])
    cached = ax.transform(model, config)
    suffix = ".onnx" if args.format == "onnx" else ".engine"
    out = Path(args.out or f"adacache_{args.model}{suffix}")
    onnx_path = out if args.format == "onnx" else out.with_suffix(".onnx")
    print(f"exporting {args.model} ({type(model).__name__}, {args.steps} steps, codebook {args.codebook}) to {onnx_path}")
    target = "tensorrt" if args.format == "tensorrt" else None
    info = to_onnx(cached, call, onnx_path, opset=args.opset, external_data=args.external_data or None,
                   progress=line, target=target)
    print(f"  {info.num_if_nodes} If node(s) for regions {info.metadata['regions']}; state {info.state_names}")
    if args.verify:
        started = time.perf_counter()
        runner = OnnxRunner(onnx_path)
        got = runner(**call)[0]
        with torch.no_grad():
            ax.reset(cached)
            expected = cached(**call)[0]
        line("ORT session + one step", time.perf_counter() - started)
        error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
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
