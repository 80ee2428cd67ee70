"""Reference video DiT for adacache_fx: synthetic captioned clips, a tiny Wan transformer, a diffusers-style
pipeline and a caption-faithfulness check."""

from .checks import ClipCheck, check_clip, check_clips, check_rates
from .data import (
    COLOURS,
    DIRECTIONS,
    MAX_CAPTION_LEN,
    SHAPES,
    SIZES,
    SPEEDS,
    VOCAB,
    Caption,
    decode_tokens,
    encode_captions,
    evaluation_captions,
    parse_caption,
    render_clip,
    sample_batch,
    sample_caption,
)

# The model names import diffusers (seconds); load them on first access so data/checks stay light.
_MODEL_NAMES = (
    "REFERENCE_CONFIG",
    "WEIGHTS_DIR",
    "CaptionEncoder",
    "build_reference_model",
    "describe_reference_model",
    "load_reference_model",
    "save_reference_model",
    "weights_label",
)


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "MAX_CAPTION_LEN",
    "REFERENCE_CONFIG",
    "SHAPES",
    "SIZES",
    "SPEEDS",
    "VOCAB",
    "WEIGHTS_DIR",
    "Caption",
    "CaptionEncoder",
    "ClipCheck",
    "build_reference_model",
    "check_clip",
    "check_clips",
    "check_rates",
    "decode_tokens",
    "describe_reference_model",
    "encode_captions",
    "evaluation_captions",
    "load_reference_model",
    "parse_caption",
    "render_clip",
    "sample_batch",
    "sample_caption",
    "save_reference_model",
    "weights_label",
]
