"""The reference model: a tiny pixel-space video transformer plus a learned caption encoder.

Two families share the data, the caption encoder and the checks: ``"wan"`` (``WanTransformer3DModel``, the
caption reaches the model through cross-attention only; the bundled default) and ``"hunyuan"``
(``HunyuanVideoTransformer3DModel``, which also adds a pooled caption embedding to the timestep embedding,
so the caption modulates every block as DiT's class label does).

Weights live in ``adacache_fx/tools/reference/weights/`` as safetensors (``transformer.safetensors``,
``caption_encoder.safetensors``) next to a ``config.json``; they are written by
``examples/train_reference.py --export``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel
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

#: ``HunyuanVideoTransformer3DModel`` kwargs for the same clip: 4x4 patches, width 128 (2 heads x 64), two
#: dual-stream and four single-stream blocks, one token-refiner block. RoPE axes (16, 24, 24) sum to the
#: head dim. The pooled caption (``pooled_projections``) is added to the timestep embedding.
HUNYUAN_REFERENCE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "num_layers": 2,
    "num_single_layers": 4,
    "num_refiner_layers": 1,
    "mlp_ratio": 4.0,
    "patch_size": 4,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": False,
    "text_embed_dim": 64,
    "pooled_projection_dim": 64,
    "rope_theta": 256.0,
    "rope_axes_dim": (16, 24, 24),
}

CAPTION_ENCODER_CONFIG: dict = {"vocab_size": len(VOCAB), "dim": 64, "max_len": MAX_CAPTION_LEN}

#: family -> (transformer class, transformer kwargs, caption encoder kwargs)
FAMILIES: dict[str, tuple[type, dict, dict]] = {
    "wan": (WanTransformer3DModel, REFERENCE_CONFIG, CAPTION_ENCODER_CONFIG),
    "hunyuan": (HunyuanVideoTransformer3DModel, HUNYUAN_REFERENCE_CONFIG, CAPTION_ENCODER_CONFIG | {"pooled_dim": 64}),
}


class CaptionEncoder(nn.Module):
    """Token + learned position embeddings: ``LongTensor[B, L] -> [B, L, dim]``.

    Padding positions (token 0) are zeroed, like the zero-padded T5 states Wan is trained with, so the empty
    caption (the classifier-free-guidance input) maps to all zeros. With ``pooled_dim`` it also has a
    bag-of-words embedding (the mean of per-word vectors, zero for the empty caption) for models that take a
    pooled caption (``pooled_projections``), the role CLIP's pooled output plays in HunyuanVideo.
    """

    def __init__(
        self,
        vocab_size: int = len(VOCAB),
        dim: int = 64,
        max_len: int = MAX_CAPTION_LEN,
        pooled_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position_embedding = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.pooled_embedding = nn.Embedding(vocab_size, pooled_dim, padding_idx=0) if pooled_dim else None

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.token_embedding(token_ids) + self.position_embedding[: token_ids.shape[1]]
        return hidden * (token_ids != 0).unsqueeze(-1).to(hidden.dtype)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Tokenise and embed caption strings on this module's device."""
        return self(encode_captions(texts).to(self.position_embedding.device))

    def conditioning(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The transformer's caption keyword arguments: ``encoder_hidden_states``, and with a pooled
        embedding also ``encoder_attention_mask`` (real tokens, plus position 0 so that the empty caption
        keeps one zero token) and ``pooled_projections``."""
        kwargs = {"encoder_hidden_states": self(token_ids)}
        if self.pooled_embedding is not None:
            real = (token_ids != 0).unsqueeze(-1)
            count = real.sum(1).clamp(min=1)
            kwargs["pooled_projections"] = (self.pooled_embedding(token_ids) * real).sum(1) / count
            mask = token_ids != 0
            mask[:, 0] = True
            kwargs["encoder_attention_mask"] = mask.to(kwargs["encoder_hidden_states"].dtype)
        return kwargs

    def encode_conditioning(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """:meth:`conditioning` of caption strings, on this module's device."""
        return self.conditioning(encode_captions(texts).to(self.position_embedding.device))


def build_reference_model(family: str = "wan", **overrides) -> tuple[nn.Module, CaptionEncoder]:
    """Freshly initialised ``(transformer, caption_encoder)`` of a family in :data:`FAMILIES`; ``overrides``
    replace entries of the family's transformer kwargs (``num_single_layers=8``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown reference family {family!r}; expected one of {sorted(FAMILIES)}")
    cls, t_cfg, e_cfg = FAMILIES[family]
    unknown = sorted(set(overrides) - set(t_cfg))
    if unknown:
        raise ValueError(f"{family!r} reference model has no setting {unknown}; settings: {sorted(t_cfg)}")
    return cls(**(t_cfg | overrides)), CaptionEncoder(**e_cfg)


def describe_reference_model(transformer: nn.Module) -> str:
    """One line naming the class and the blocks: ``HunyuanVideoTransformer3DModel, 2 + 8 single-stream blocks``."""
    single = getattr(transformer.config, "num_single_layers", 0)
    layers = transformer.config.num_layers
    blocks = f"{layers} + {single} single-stream blocks" if single else f"{layers} blocks"
    return f"{type(transformer).__name__}, {blocks}"


def weights_label(path: str | Path | None, transformer: nn.Module) -> str:
    """How a result table names its model: the folder (or ``bundled``), :func:`describe_reference_model` and
    the first 12 hex digits of the transformer file's sha256 (which bundled weights, after they change)."""
    folder = Path(path) if path is not None else WEIGHTS_DIR
    digest = hashlib.sha256((folder / TRANSFORMER_FILE).read_bytes()).hexdigest()[:12]
    return f"{path or 'bundled'} ({describe_reference_model(transformer)}, sha256 {digest})"


def _json_config(family: str, transformer: nn.Module) -> dict:
    """The family's settings as ``transformer`` holds them (overrides included), JSON-ready."""
    _, t_cfg, e_cfg = FAMILIES[family]
    values = {k: transformer.config[k] for k in t_cfg}
    transformer = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return {"family": family, "transformer": transformer, "caption_encoder": e_cfg, "vocab": list(VOCAB)}


def save_reference_model(
    transformer: nn.Module,
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
    family = next(f for f, (cls, _, _) in FAMILIES.items() if isinstance(transformer, cls))
    config = _json_config(family, transformer) | (extra_config or {})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_reference_model(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, CaptionEncoder]:
    """Load ``(transformer, caption_encoder)`` in eval mode from safetensors (default: package weights)."""
    folder = Path(path) if path is not None else WEIGHTS_DIR
    missing = [n for n in (CONFIG_FILE, TRANSFORMER_FILE, CAPTION_ENCODER_FILE) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"reference weights missing in {folder}: {', '.join(missing)} "
            "(train and export them with examples/train_reference.py --export)"
        )
    config = json.loads((folder / CONFIG_FILE).read_text())
    family = config.get("family", "wan")
    t_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config["transformer"].items()}
    if list(config.get("vocab", VOCAB)) != list(VOCAB):
        raise ValueError("the saved caption vocabulary differs from adacache_fx.tools.reference.data.VOCAB")
    transformer = FAMILIES[family][0](**t_cfg)
    caption_encoder = CaptionEncoder(**config["caption_encoder"])
    transformer.load_state_dict(load_file(str(folder / TRANSFORMER_FILE)))
    caption_encoder.load_state_dict(load_file(str(folder / CAPTION_ENCODER_FILE)))
    return transformer.to(device).eval(), caption_encoder.to(device).eval()
