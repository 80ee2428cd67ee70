"""The reference model: a tiny pixel-space Wan transformer plus a learned caption encoder.

Weights live in ``adacache_fx/tools/reference/weights/`` as safetensors (``transformer.safetensors``,
``caption_encoder.safetensors``) next to a ``config.json``; they are written by
``examples/train_reference.py --export``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file
from torch import nn

from .data import MAX_CAPTION_LEN, VOCAB, encode_captions

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TRANSFORMER_FILE = "transformer.safetensors"
CAPTION_ENCODER_FILE = "caption_encoder.safetensors"
CONFIG_FILE = "config.json"

#: ``WanTransformer3DModel`` kwargs: pixel space (3 channels), 4x4 spatial patches, so a [3, 8, 32, 32] clip
#: is 8 x 8 x 8 = 512 tokens of width 128 (2 heads x 64). The RoPE table (64 positions) covers 8 frames and
#: 8 x 8 patches. About 1.75 M parameters.
REFERENCE_CONFIG: dict = {
    "patch_size": (1, 4, 4),
    "in_channels": 3,
    "out_channels": 3,
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "ffn_dim": 512,
    "num_layers": 6,
    "text_dim": 64,
    "freq_dim": 64,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 64,
}

CAPTION_ENCODER_CONFIG: dict = {"vocab_size": len(VOCAB), "dim": 64, "max_len": MAX_CAPTION_LEN}


class CaptionEncoder(nn.Module):
    """Token + learned position embeddings: ``LongTensor[B, L] -> [B, L, dim]``.

    Padding positions (token 0) are zeroed, like the zero-padded T5 states Wan is trained with, so the empty
    caption (the classifier-free-guidance input) maps to all zeros.
    """

    def __init__(self, vocab_size: int = len(VOCAB), dim: int = 64, max_len: int = MAX_CAPTION_LEN) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position_embedding = nn.Parameter(torch.randn(max_len, dim) * 0.02)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.token_embedding(token_ids) + self.position_embedding[: token_ids.shape[1]]
        return hidden * (token_ids != 0).unsqueeze(-1).to(hidden.dtype)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Tokenise and embed caption strings on this module's device."""
        return self(encode_captions(texts).to(self.position_embedding.device))


def build_reference_model() -> tuple[WanTransformer3DModel, CaptionEncoder]:
    """Freshly initialised ``(transformer, caption_encoder)``."""
    return WanTransformer3DModel(**REFERENCE_CONFIG), CaptionEncoder(**CAPTION_ENCODER_CONFIG)


def _json_config() -> dict:
    transformer = {k: list(v) if isinstance(v, tuple) else v for k, v in REFERENCE_CONFIG.items()}
    return {"transformer": transformer, "caption_encoder": CAPTION_ENCODER_CONFIG, "vocab": list(VOCAB)}


def save_reference_model(
    transformer: WanTransformer3DModel,
    caption_encoder: CaptionEncoder,
    path: str | Path | None = None,
    extra_config: dict | None = None,
) -> Path:
    """Write both state dicts as safetensors plus ``config.json`` into ``path`` (default: package weights)."""
    folder = Path(path) if path is not None else WEIGHTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for module, name in ((transformer, TRANSFORMER_FILE), (caption_encoder, CAPTION_ENCODER_FILE)):
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(folder / name), metadata={"format": "pt"})
        (folder / name).chmod(0o644)  # safetensors creates files owner-only
    config = _json_config() | (extra_config or {})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_reference_model(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[WanTransformer3DModel, CaptionEncoder]:
    """Load ``(transformer, caption_encoder)`` in eval mode from safetensors (default: package weights)."""
    folder = Path(path) if path is not None else WEIGHTS_DIR
    missing = [n for n in (CONFIG_FILE, TRANSFORMER_FILE, CAPTION_ENCODER_FILE) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"reference weights missing in {folder}: {', '.join(missing)} "
            "(train and export them with examples/train_reference.py --export)"
        )
    config = json.loads((folder / CONFIG_FILE).read_text())
    t_cfg = dict(config["transformer"])
    t_cfg["patch_size"] = tuple(t_cfg["patch_size"])
    if list(config.get("vocab", VOCAB)) != list(VOCAB):
        raise ValueError("the saved caption vocabulary differs from adacache_fx.tools.reference.data.VOCAB")
    transformer = WanTransformer3DModel(**t_cfg)
    caption_encoder = CaptionEncoder(**config["caption_encoder"])
    transformer.load_state_dict(load_file(str(folder / TRANSFORMER_FILE)))
    caption_encoder.load_state_dict(load_file(str(folder / CAPTION_ENCODER_FILE)))
    return transformer.to(device).eval(), caption_encoder.to(device).eval()
