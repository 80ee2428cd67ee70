"""The corpus: the tiny configurations diffusers' own test suite builds for each transformer class.

One :class:`CorpusConfig` per tester configuration of diffusers' ``tests/models/transformers/`` (the
``BaseModelTesterConfig`` subclasses' ``get_init_dict()`` / ``get_dummy_inputs()``, snapshot at commit
58eb52c0803ea9af3abec60841c2a093bdf1f951), plus Kandinsky 5, whose transformer only a pipeline test builds
(``tests/pipelines/kandinsky5/test_kandinsky5.py``: its components, and the inputs its pipeline hands the
transformer). Configurations that load a Hub checkpoint for quantization tests are left out: they are not
random tiny models. The sizes, dims and layer counts are the tests'; the inputs are described as data
(:mod:`.inputs`), the timestep as a :class:`~.inputs.Timestep` that follows the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .inputs import (
    Arange,
    Cat,
    Construct,
    Ids,
    ListOf,
    Literal,
    Ones,
    Randint,
    Randn,
    Timestep,
    Value,
    Zeros,
)

#: The diffusers snapshot the numbers come from.
DIFFUSERS_COMMIT = "58eb52c0803ea9af3abec60841c2a093bdf1f951"


@dataclass(frozen=True)
class CorpusConfig:
    """One configuration: a diffusers class, its constructor kwargs and its example inputs."""

    name: str  # unique; the tester config's name without "TesterConfig"
    cls: str  # the diffusers class name
    init: dict
    inputs: dict  # name -> spec (see .inputs); the call adds return_dict=False
    source: str  # the diffusers test (file and tester config) the numbers come from
    timestep: str = "timestep"  # the input that is the timestep
    video: bool = False  # a video model (the CI subset)
    skip: str | None = None  # why it cannot run here (a missing package), else None
    tolerance: float = 0.0  # never-skip: the max abs difference allowed (0: identical)
    notes: tuple[str, ...] = field(default_factory=tuple)


def _src(test: str, config: str) -> str:
    return f"tests/models/transformers/{test}.py::{config}"


def _ti(*shape: int) -> Timestep:
    """Integer timestep drawn from [0, 1000) in the test."""
    return Timestep(shape, "int64", 999)


def _tf(*shape: int, scale: float = 1000.0, ratios: tuple[float, ...] | None = None) -> Timestep:
    """Float timestep; scale 1000 for [0, 1000) draws, 1.0 for [0, 1] ones."""
    return Timestep(shape, "float32", scale, ratios)


def _t1(*shape: int) -> Timestep:
    return _tf(*shape, scale=1.0)


_NO_TORCHVISION = ("needs torchvision: CosmosTransformer3DModel builds its padding mask with "
                   "torchvision.transforms.functional.resize (transformer_cosmos.py:735), and the CPU torch wheel "
                   "here has no matching torchvision")

_WAN = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
        "out_channels": 4, "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}
_COGVIDEOX = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4,
              "time_embed_dim": 2, "text_embed_dim": 8, "num_layers": 2, "sample_width": 8, "sample_height": 8,
              "sample_frames": 8, "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 8}
_HUNYUAN_VIDEO = {"num_attention_heads": 2, "attention_head_dim": 10, "num_layers": 1, "num_single_layers": 1,
                  "num_refiner_layers": 1, "patch_size": 1, "patch_size_t": 1, "text_embed_dim": 16,
                  "pooled_projection_dim": 8, "rope_axes_dim": (2, 4, 4)}
_SD3 = {"sample_size": 32, "patch_size": 1, "in_channels": 4, "num_layers": 4, "attention_head_dim": 8,
        "num_attention_heads": 4, "caption_projection_dim": 32, "joint_attention_dim": 32, "pooled_projection_dim": 64,
        "out_channels": 4, "pos_embed_max_size": 96}
_COSMOS = {"out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 12, "num_layers": 2, "mlp_ratio": 2,
           "text_embed_dim": 16, "adaln_lora_dim": 4, "max_size": (4, 32, 32), "patch_size": (1, 2, 2),
           "rope_scale": (2.0, 1.0, 1.0), "concat_padding_mask": True, "extra_pos_embed_type": "learnable"}
_FLUX_LIKE_INPUTS = {  # Flux, Bria, Chroma, Ovis, LongCat-Image: 4x4 latents packed, 48 text tokens
    "hidden_states": Randn((1, 16, 4)), "encoder_hidden_states": Randn((1, 48, 32)),
    "img_ids": Randn((16, 3)), "txt_ids": Randn((48, 3)), "timestep": _t1(1),
}
_FLUX2 = {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
          "num_attention_heads": 2, "joint_attention_dim": 32, "timestep_guidance_channels": 256,
          "axes_dims_rope": [4, 4, 4, 4]}
_COGVIEW_CONDITIONS = {"original_size": Literal([[64, 64], [64, 64]]), "target_size": Literal([[64, 64], [64, 64]]),
                       "crop_coords": Literal([[0, 0], [0, 0]])}
_IMAGE_OFFSET = 65536  # Ideogram 4's image position offset
_MINIMAX_TOKENS = (4, 6, 8)  # text, audio, video rows of MiniMax H3's packed sequence


def _minimax_layout() -> dict:
    text, audio, video = _MINIMAX_TOKENS
    length = text + audio + video
    first_video = text + audio
    rows = [[float(i), float((i - first_video) % 4) if i >= first_video else 0.0,
             float((i - first_video) % 2) if i >= first_video else 0.0] for i in range(length)]
    return {
        "timestep": _tf(2, scale=1.0, ratios=(0.7, 0.3)),  # the video rows' and the audio rows' timesteps
        "timestep_indices": Literal([0] * text + [1] * audio + [0] * video),
        "token_tags": Literal([1] * text + [2] * audio + [0] * video),  # 0 video, 1 text, 2 audio
        "position_ids": Literal(rows, "float32"),
        "video_indices": Arange(first_video, length),
        "audio_indices": Arange(text, first_video),
        "text_indices": Arange(0, text),
    }


CONFIGS: tuple[CorpusConfig, ...] = (
    CorpusConfig(
        "DiTTransformer2D", "DiTTransformer2DModel",
        {"in_channels": 4, "out_channels": 8, "activation_fn": "gelu-approximate", "num_attention_heads": 2,
         "attention_head_dim": 4, "attention_bias": True, "num_layers": 1, "norm_type": "ada_norm_zero",
         "num_embeds_ada_norm": 8, "patch_size": 2, "sample_size": 8},
        {"hidden_states": Randn((4, 4, 8, 8)), "timestep": _ti(4), "class_labels": Randint(0, 4, (4,))},
        "tests/models/transformers/test_models_dit_transformer2d.py::DiTTransformer2DTesterConfig",
    ),
    CorpusConfig(
        "PixArtTransformer2D", "PixArtTransformer2DModel",
        {"sample_size": 8, "num_layers": 1, "patch_size": 2, "attention_head_dim": 2, "num_attention_heads": 2,
         "in_channels": 4, "cross_attention_dim": 8, "out_channels": 8, "attention_bias": True,
         "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 8, "norm_type": "ada_norm_single",
         "norm_elementwise_affine": False, "norm_eps": 1e-6, "use_additional_conditions": False,
         "caption_channels": None},
        {"hidden_states": Randn((4, 4, 8, 8)), "timestep": _ti(4), "encoder_hidden_states": Randn((4, 8, 8)),
         "added_cond_kwargs": Value({"aspect_ratio": None, "resolution": None})},
        "tests/models/transformers/test_models_pixart_transformer2d.py::PixArtTransformer2DTesterConfig",
    ),
    CorpusConfig(
        "PriorTransformer", "PriorTransformer",
        {"num_attention_heads": 2, "attention_head_dim": 4, "num_layers": 2, "embedding_dim": 8,
         "num_embeddings": 7, "additional_embeddings": 4},
        {"hidden_states": Randn((4, 8)), "timestep": Timestep((), "int64", 999, python=True),
         "proj_embedding": Randn((4, 8)), "encoder_hidden_states": Randn((4, 7, 8))},
        "tests/models/transformers/test_models_prior.py::PriorTransformerTesterConfig",
        notes=("the test passes the timestep as a Python int",),
    ),
    CorpusConfig(
        "AceStepTransformer1DModel", "AceStepTransformer1DModel",
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "in_channels": 24, "audio_acoustic_hidden_dim": 8,
         "patch_size": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "sliding_window": 16},
        {"hidden_states": Randn((2, 8, 8)), "timestep": _t1(2), "timestep_r": _t1(2),
         "encoder_hidden_states": Randn((2, 10, 32)), "context_latents": Randn((2, 8, 16))},
        _src("test_models_transformer_ace_step", "AceStepTransformer1DModelTesterConfig"),
        notes=(
            "its last layer returns a transposed-layout stream: the region's output keeps that layout (it was "
            "4.8e-7 off at 2db6eac, when the RMSNorm after the stack read a contiguous copy)",),
    ),
    CorpusConfig(
        "AllegroTransformer", "AllegroTransformer3DModel",
        {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4, "num_layers": 1,
         "cross_attention_dim": 16, "sample_width": 8, "sample_height": 8, "sample_frames": 8, "caption_channels": 8},
        {"hidden_states": Randn((2, 4, 2, 8, 8)), "encoder_hidden_states": Randn((2, 16, 8)), "timestep": _ti(2)},
        _src("test_models_transformer_allegro", "AllegroTransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "AnyFlowTransformer3D", "AnyFlowTransformer3DModel",
        {**{k: v for k, v in _WAN.items() if k != "qk_norm"}, "gate_value": 0.25, "deltatime_type": "r"},
        {"hidden_states": Randn((1, 2, 4, 16, 16)), "timestep": _tf(1, 2),
         "r_timestep": _tf(1, 2, ratios=(0.5, 0.5)), "encoder_hidden_states": Randn((1, 12, 16))},
        _src("test_models_transformer_anyflow", "AnyFlowTransformer3DTesterConfig"), video=True,
        notes=("r_timestep follows the schedule at half the timestep (the test: 500 and 250)",),
    ),
    CorpusConfig(
        "AnyFlowFARTransformer3D", "AnyFlowFARTransformer3DModel",
        {"patch_size": (1, 2, 2), "compressed_patch_size": (1, 4, 4), "full_chunk_limit": 3,
         **{k: v for k, v in _WAN.items() if k not in ("qk_norm", "patch_size")},
         "gate_value": 0.25, "deltatime_type": "r"},
        {"hidden_states": Randn((1, 4, 4, 16, 16)), "timestep": _tf(1, 4),
         "r_timestep": _tf(1, 4, ratios=(0.5,) * 4), "encoder_hidden_states": Randn((1, 12, 16)),
         "chunk_partition": Value([2, 2])},
        _src("test_models_transformer_anyflow_far", "AnyFlowFARTransformer3DTesterConfig"), video=True,
    ),
    CorpusConfig(
        "AuraFlowTransformer", "AuraFlowTransformer2DModel",
        {"sample_size": 32, "patch_size": 2, "in_channels": 4, "num_mmdit_layers": 1, "num_single_dit_layers": 1,
         "attention_head_dim": 8, "num_attention_heads": 4, "caption_projection_dim": 32, "joint_attention_dim": 32,
         "out_channels": 4, "pos_embed_max_size": 256},
        {"hidden_states": Randn((2, 4, 32, 32)), "encoder_hidden_states": Randn((2, 256, 32)), "timestep": _ti(2)},
        _src("test_models_transformer_aura_flow", "AuraFlowTransformerTesterConfig"),
    ),
    CorpusConfig(
        "BriaTransformer", "BriaTransformer2DModel",
        {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
         "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": None,
         "axes_dims_rope": [0, 4, 4]},
        dict(_FLUX_LIKE_INPUTS),
        _src("test_models_transformer_bria", "BriaTransformerTesterConfig"),
    ),
    CorpusConfig(
        "BriaFiboTransformer", "BriaFiboTransformer2DModel",
        {"patch_size": 1, "in_channels": 48, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
         "num_attention_heads": 2, "joint_attention_dim": 64, "text_encoder_dim": 32, "pooled_projection_dim": None,
         "axes_dims_rope": [0, 4, 4]},
        {"hidden_states": Randn((1, 256, 48)), "encoder_hidden_states": Randn((1, 32, 64)),
         "img_ids": Randn((256, 3)), "txt_ids": Randn((32, 3)), "timestep": _t1(1),
         "text_encoder_layers": ListOf((Randn((1, 32, 32)), Randn((1, 32, 32))))},
        _src("test_models_transformer_bria_fibo", "BriaFiboTransformerTesterConfig"),
        notes=("the test's two text-encoder layers are slices of encoder_hidden_states; here two draws",),
    ),
    CorpusConfig(
        "ChromaTransformer", "ChromaTransformer2DModel",
        {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": [4, 4, 8],
         "approximator_num_channels": 8, "approximator_hidden_dim": 16, "approximator_layers": 1},
        dict(_FLUX_LIKE_INPUTS),
        _src("test_models_transformer_chroma", "ChromaTransformerTesterConfig"),
    ),
    CorpusConfig(
        "ChronoEditTransformer", "ChronoEditTransformer3DModel",
        {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 16,
         "out_channels": 16, "text_dim": 32, "freq_dim": 16, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
         "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None,
         "rope_max_seq_len": 64, "pos_embed_seq_len": None, "rope_temporal_skip_len": 8},
        {"hidden_states": Randn((1, 16, 2, 8, 8)), "timestep": _ti(1), "encoder_hidden_states": Randn((1, 12, 32)),
         "encoder_hidden_states_image": Value(None)},
        _src("test_models_transformer_chronoedit", "ChronoEditTransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "CogVideoXTransformer", "CogVideoXTransformer3DModel",
        {**_COGVIDEOX, "patch_size_t": None},
        {"hidden_states": Randn((2, 1, 4, 8, 8)), "encoder_hidden_states": Randn((2, 8, 8)), "timestep": _ti(2)},
        _src("test_models_transformer_cogvideox", "CogVideoXTransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "CogVideoX15Transformer", "CogVideoXTransformer3DModel",
        {**_COGVIDEOX, "patch_size_t": 2, "use_rotary_positional_embeddings": True},
        {"hidden_states": Randn((2, 2, 4, 8, 8)), "encoder_hidden_states": Randn((2, 8, 8)), "timestep": _ti(2)},
        _src("test_models_transformer_cogvideox", "CogVideoX15TransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "CogView3PlusTransformer", "CogView3PlusTransformer2DModel",
        {"patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 4, "num_attention_heads": 2,
         "out_channels": 4, "text_embed_dim": 8, "time_embed_dim": 8, "condition_dim": 2, "pos_embed_max_size": 8,
         "sample_size": 8},
        {"hidden_states": Randn((2, 4, 8, 8)), "encoder_hidden_states": Randn((2, 8, 8)), **_COGVIEW_CONDITIONS,
         "timestep": _ti(2)},
        _src("test_models_transformer_cogview3plus", "CogView3PlusTransformerTesterConfig"),
    ),
    CorpusConfig(
        "CogView4Transformer", "CogView4Transformer2DModel",
        {"patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 4, "num_attention_heads": 4,
         "out_channels": 4, "text_embed_dim": 8, "time_embed_dim": 8, "condition_dim": 4},
        {"hidden_states": Randn((2, 4, 8, 8)), "encoder_hidden_states": Randn((2, 8, 8)), "timestep": _ti(2),
         **_COGVIEW_CONDITIONS},
        _src("test_models_transformer_cogview4", "CogView4TransformerTesterConfig"),
    ),
    CorpusConfig(
        "ConsisIDTransformer", "ConsisIDTransformer3DModel",
        {**{k: v for k, v in _COGVIDEOX.items()}, "num_layers": 1, "cross_attn_interval": 1, "is_kps": False,
         "is_train_face": True, "cross_attn_dim_head": 1, "cross_attn_num_heads": 1, "LFE_id_dim": 2,
         "LFE_vit_dim": 2, "LFE_depth": 5, "LFE_dim_head": 8, "LFE_num_heads": 2, "LFE_num_id_token": 1,
         "LFE_num_querie": 1, "LFE_output_dim": 10, "LFE_ff_mult": 1, "LFE_num_scale": 1},
        {"hidden_states": Randn((2, 1, 4, 8, 8)), "encoder_hidden_states": Randn((2, 8, 8)), "timestep": _ti(2),
         "id_vit_hidden": ListOf((Ones((2, 2, 2)),)), "id_cond": Ones((2, 2))},
        _src("test_models_transformer_consisid", "ConsisIDTransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "CosmosTransformer", "CosmosTransformer3DModel",
        {"in_channels": 4, **_COSMOS},
        {"hidden_states": Randn((1, 4, 1, 16, 16)), "timestep": _ti(1), "encoder_hidden_states": Randn((1, 12, 16)),
         "attention_mask": Ones((1, 12)), "fps": Value(30), "padding_mask": Zeros((1, 1, 16, 16))},
        _src("test_models_transformer_cosmos", "CosmosTransformerTesterConfig"), video=True, skip=_NO_TORCHVISION,
    ),
    CorpusConfig(
        "CosmosTransformerVideoToWorld", "CosmosTransformer3DModel",
        {"in_channels": 5, **_COSMOS},
        {"hidden_states": Randn((1, 4, 1, 16, 16)), "timestep": _ti(1), "encoder_hidden_states": Randn((1, 12, 16)),
         "attention_mask": Ones((1, 12)), "fps": Value(30), "condition_mask": Ones((1, 1, 1, 16, 16)),
         "padding_mask": Zeros((1, 1, 16, 16))},
        _src("test_models_transformer_cosmos", "CosmosTransformerVideoToWorldTesterConfig"), video=True,
        skip=_NO_TORCHVISION,
    ),
    CorpusConfig(
        "Cosmos3OmniTransformer", "Cosmos3OmniTransformer",
        {"head_dim": 6, "hidden_act": "relu2", "hidden_size": 12, "intermediate_size": 24, "latent_channel": 2,
         "latent_patch_size": 1, "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 1,
         "patch_latent_dim": 2, "qk_norm_for_text": False, "rms_norm_eps": 1e-5, "rope_axes_dim": [1, 1, 1],
         "rope_theta": 100000000.0, "vocab_size": 32},
        {"input_ids": Literal([1, 2]), "text_indexes": Literal([0, 1]), "position_ids": Zeros((3, 3), "int64"),
         "und_len": Value(2), "sequence_length": Value(3), "vision_tokens": ListOf((Randn((1, 2, 1, 1, 1)),)),
         "vision_token_shapes": Value([(1, 1, 1)]), "vision_sequence_indexes": Arange(2, 3),
         "vision_mse_loss_indexes": Arange(2, 3), "vision_timesteps": _t1(1),
         "vision_noisy_frame_indexes": ListOf((Literal([0]),))},
        _src("test_models_transformer_cosmos3", "Cosmos3OmniTransformerTesterConfig"),
        timestep="vision_timesteps", video=True,
    ),
    CorpusConfig(
        "EasyAnimateTransformer", "EasyAnimateTransformer3DModel",
        {"attention_head_dim": 16, "num_attention_heads": 2, "in_channels": 4, "mmdit_layers": 2, "num_layers": 2,
         "out_channels": 4, "patch_size": 2, "sample_height": 60, "sample_width": 90, "text_embed_dim": 16,
         "time_embed_dim": 8, "time_position_encoding_type": "3d_rope", "timestep_activation_fn": "silu"},
        {"hidden_states": Randn((2, 4, 2, 16, 16)), "timestep": _ti(2), "timestep_cond": Value(None),
         "encoder_hidden_states": Randn((2, 16, 16)), "encoder_hidden_states_t5": Value(None),
         "inpaint_latents": Value(None), "control_latents": Value(None)},
        _src("test_models_transformer_easyanimate", "EasyAnimateTransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "ErnieImageTransformer", "ErnieImageTransformer2DModel",
        {"hidden_size": 16, "num_attention_heads": 1, "num_layers": 1, "ffn_hidden_size": 16, "in_channels": 16,
         "out_channels": 16, "patch_size": 1, "text_in_dim": 16, "rope_theta": 256, "rope_axes_dim": (8, 4, 4),
         "eps": 1e-6, "qk_layernorm": True},
        {"hidden_states": Randn((1, 16, 16, 16)), "timestep": _t1(1), "text_bth": Randn((1, 16, 16)),
         "text_lens": Literal([16])},
        _src("test_models_transformer_ernie_image", "ErnieImageTransformerTesterConfig"),
    ),
    CorpusConfig(
        "FluxTransformer", "FluxTransformer2DModel",
        {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
         "axes_dims_rope": [4, 4, 8]},
        {"hidden_states": Randn((1, 16, 4)), "encoder_hidden_states": Randn((1, 48, 32)),
         "pooled_projections": Randn((1, 32)), "img_ids": Randn((16, 3)), "txt_ids": Randn((48, 3)),
         "timestep": _t1(1)},
        _src("test_models_transformer_flux", "FluxTransformerTesterConfig"),
    ),
    CorpusConfig(
        "Flux2Transformer", "Flux2Transformer2DModel", dict(_FLUX2),
        {"hidden_states": Randn((1, 16, 4)), "encoder_hidden_states": Randn((1, 48, 32)),
         "img_ids": Ids((1, 4, 4, 1), batch=1), "txt_ids": Ids((1, 1, 1, 48), batch=1), "timestep": _t1(1),
         "guidance": Literal([1.0], "float32")},
        _src("test_models_transformer_flux2", "Flux2TransformerTesterConfig"),
    ),
    CorpusConfig(
        "Flux2TransformerKVCache", "Flux2Transformer2DModel", dict(_FLUX2),
        {"hidden_states": Randn((1, 20, 4)), "encoder_hidden_states": Randn((1, 48, 32)),
         "img_ids": Cat((Ids((1, 4, 1, 1), batch=1), Ids((1, 4, 4, 1), batch=1)), dim=1),
         "txt_ids": Ids((1, 1, 1, 48), batch=1), "timestep": _t1(1), "guidance": Literal([1.0], "float32")},
        _src("test_models_transformer_flux2", "Flux2TransformerKVCacheTesterConfig"),
        notes=("4 reference tokens before the 16 image tokens; the plain call (no KV cache passed)",),
    ),
    CorpusConfig(
        "GlmImageTransformer", "GlmImageTransformer2DModel",
        {"patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1, "attention_head_dim": 8,
         "num_attention_heads": 2, "text_embed_dim": 32, "time_embed_dim": 16, "condition_dim": 8,
         "prior_vq_quantizer_codebook_size": 64},
        {"hidden_states": Randn((1, 4, 8, 8)), "encoder_hidden_states": Randn((1, 12, 32)),
         "prior_token_id": Randint(0, 64, (1,)), "prior_token_drop": Zeros((1,), "bool"), "timestep": _ti(1),
         "target_size": Literal([[8.0, 8.0]], "float32"), "crop_coords": Literal([[0.0, 0.0]], "float32")},
        _src("test_models_transformer_glm_image", "GlmImageTransformerTesterConfig"),
    ),
    CorpusConfig(
        "HeliosTransformer3D", "HeliosTransformer3DModel",
        {**{k: v for k, v in _WAN.items() if k != "rope_max_seq_len"}, "rope_dim": (4, 4, 4),
         "has_multi_term_memory_patch": True, "guidance_cross_attn": True, "zero_history_timestep": True,
         "is_amplify_history": False},
        {"hidden_states": Randn((1, 4, 2, 16, 16)), "timestep": _ti(1), "encoder_hidden_states": Randn((1, 12, 16)),
         "indices_hidden_states": Ones((1, 2)), "indices_latents_history_short": Ones((1, 1)),
         "indices_latents_history_mid": Ones((1, 1)), "indices_latents_history_long": Ones((1, 4)),
         "latents_history_short": Randn((1, 4, 1, 16, 16)), "latents_history_mid": Randn((1, 4, 1, 16, 16)),
         "latents_history_long": Randn((1, 4, 4, 16, 16))},
        _src("test_models_transformer_helios", "HeliosTransformer3DTesterConfig"), video=True,
    ),
    CorpusConfig(
        "HiDreamTransformer", "HiDreamImageTransformer2DModel",
        {"patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 1,
         "attention_head_dim": 8, "num_attention_heads": 4, "caption_channels": [8, 4], "text_emb_dim": 8,
         "num_routed_experts": 2, "num_activated_experts": 2, "axes_dims_rope": (4, 2, 2),
         "max_resolution": (32, 32), "llama_layers": (0, 1), "force_inference_output": True},
        {"hidden_states": Randn((2, 4, 32, 32)), "encoder_hidden_states_t5": Randn((2, 8, 8)),
         "encoder_hidden_states_llama3": Randn((2, 2, 8, 4)), "pooled_embeds": Randn((2, 8)), "timesteps": _ti(2)},
        _src("test_models_transformer_hidream", "HiDreamTransformerTesterConfig"), timestep="timesteps",
    ),
    CorpusConfig(
        "HunyuanVideo15Transformer", "HunyuanVideo15Transformer3DModel",
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
         "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": 1, "patch_size_t": 1, "text_embed_dim": 16,
         "text_embed_2_dim": 8, "image_embed_dim": 12, "rope_axes_dim": (2, 2, 4), "target_size": 16,
         "task_type": "t2v"},
        {"hidden_states": Randn((1, 4, 1, 8, 8)), "timestep": _t1(1), "encoder_hidden_states": Randn((1, 6, 16)),
         "encoder_hidden_states_2": Randn((1, 4, 8)), "encoder_attention_mask": Ones((1, 6)),
         "encoder_attention_mask_2": Ones((1, 4)), "image_embeds": Zeros((1, 3, 12))},
        _src("test_models_transformer_hunyuan_1_5", "HunyuanVideo15TransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "HunyuanDiT", "HunyuanDiT2DModel",
        {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 1, "attention_head_dim": 8,
         "num_attention_heads": 2, "cross_attention_dim": 8, "cross_attention_dim_t5": 8,
         "pooled_projection_dim": 4, "hidden_size": 16, "text_len": 4, "text_len_t5": 4,
         "activation_fn": "gelu-approximate"},
        {"hidden_states": Randn((2, 4, 8, 8)), "encoder_hidden_states": Randn((2, 4, 8)),
         "text_embedding_mask": Ones((2, 4)), "encoder_hidden_states_t5": Randn((2, 4, 8)),
         "text_embedding_mask_t5": Ones((2, 4)), "timestep": _tf(2),
         "image_meta_size": Literal([[1024, 1024, 16, 16, 0, 0]] * 2, "float32"), "style": Zeros((2,), "int64"),
         "image_rotary_emb": ListOf((Ones((1, 8)), Zeros((1, 8))))},
        _src("test_models_transformer_hunyuan_dit", "HunyuanDiTTesterConfig"),
    ),
    CorpusConfig(
        "HunyuanVideoTransformer", "HunyuanVideoTransformer3DModel",
        {"in_channels": 4, "out_channels": 4, **_HUNYUAN_VIDEO, "guidance_embeds": True, "image_condition_type": None},
        {"hidden_states": Randn((1, 4, 1, 16, 16)), "timestep": _tf(1), "encoder_hidden_states": Randn((1, 12, 16)),
         "pooled_projections": Randn((1, 8)), "encoder_attention_mask": Ones((1, 12)),
         "guidance": Randint(0, 1000, (1,), "float32")},
        _src("test_models_transformer_hunyuan_video", "HunyuanVideoTransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "HunyuanVideoI2VTransformer", "HunyuanVideoTransformer3DModel",
        {"in_channels": 9, "out_channels": 4, **_HUNYUAN_VIDEO, "guidance_embeds": False,
         "image_condition_type": "latent_concat"},
        {"hidden_states": Randn((1, 9, 1, 16, 16)), "timestep": _ti(1), "encoder_hidden_states": Randn((1, 12, 16)),
         "pooled_projections": Randn((1, 8)), "encoder_attention_mask": Ones((1, 12))},
        _src("test_models_transformer_hunyuan_video", "HunyuanVideoI2VTransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "HunyuanVideoTokenReplaceTransformer", "HunyuanVideoTransformer3DModel",
        {"in_channels": 2, "out_channels": 4, **_HUNYUAN_VIDEO, "guidance_embeds": True,
         "image_condition_type": "token_replace"},
        {"hidden_states": Randn((1, 2, 1, 16, 16)), "timestep": _ti(1), "encoder_hidden_states": Randn((1, 12, 16)),
         "pooled_projections": Randn((1, 8)), "encoder_attention_mask": Ones((1, 12)),
         "guidance": Randint(0, 1000, (1,), "float32")},
        _src("test_models_transformer_hunyuan_video", "HunyuanVideoTokenReplaceTransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "HunyuanVideoFramepackTransformer", "HunyuanVideoFramepackTransformer3DModel",
        {"in_channels": 4, "out_channels": 4, **_HUNYUAN_VIDEO, "patch_size": 2, "guidance_embeds": True,
         "image_condition_type": None, "has_image_proj": True, "image_proj_dim": 16, "has_clean_x_embedder": True},
        {"hidden_states": Randn((1, 4, 3, 4, 4)), "timestep": _ti(1), "encoder_hidden_states": Randn((1, 12, 16)),
         "pooled_projections": Randn((1, 8)), "encoder_attention_mask": Ones((1, 12)),
         "guidance": Randint(0, 1000, (1,)), "image_embeds": Randn((1, 12, 16)), "indices_latents": Ones((3,)),
         "latents_clean": Randn((1, 4, 2, 4, 4)), "indices_latents_clean": Ones((2,)),
         "latents_history_2x": Randn((1, 4, 2, 4, 4)), "indices_latents_history_2x": Ones((2,)),
         "latents_history_4x": Randn((1, 4, 8, 4, 4)), "indices_latents_history_4x": Ones((8,))},
        _src("test_models_transformer_hunyuan_video_framepack", "HunyuanVideoFramepackTransformerTesterConfig"),
        video=True,
    ),
    CorpusConfig(
        "Ideogram4Transformer", "Ideogram4Transformer2DModel",
        {"in_channels": 16, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 4,
         "intermediate_size": 32, "adaln_dim": 16, "llm_features_dim": 24, "rope_theta": 10000,
         "mrope_section": (2, 1, 1), "norm_eps": 1e-5},
        {"hidden_states": Cat((Zeros((1, 4, 16)), Randn((1, 4, 16))), dim=1),  # 4 text rows, then 4 image rows
         "encoder_hidden_states": Cat((Randn((1, 4, 24)), Zeros((1, 4, 24))), dim=1),
         "timestep": _t1(1),
         "position_ids": Literal([[[i, i, i] for i in range(4)] + [
             [_IMAGE_OFFSET, _IMAGE_OFFSET + h, _IMAGE_OFFSET + w] for h in (0, 1) for w in (0, 1)]]),
         "segment_ids": Ones((1, 8), "int64"), "indicator": Literal([[3, 3, 3, 3, 2, 2, 2, 2]])},
        _src("test_models_transformer_ideogram4", "Ideogram4TransformerTesterConfig"),
    ),
    CorpusConfig(
        "JoyImageEditTransformer", "JoyImageEditTransformer3DModel",
        {"patch_size": [1, 2, 2], "in_channels": 16, "hidden_size": 32, "num_attention_heads": 2, "text_dim": 16,
         "num_layers": 2, "rope_dim_list": [4, 6, 6], "theta": 256},
        {"hidden_states": Randn((1, 16, 1, 4, 4)), "encoder_hidden_states": Randn((1, 12, 16)), "timestep": _t1(1)},
        _src("test_models_transformer_joyimage", "JoyImageEditTransformerTesterConfig"),
    ),
    CorpusConfig(
        "JoyImageEditPlusTransformer", "JoyImageEditPlusTransformer3DModel",
        {"patch_size": [1, 2, 2], "in_channels": 16, "hidden_size": 32, "num_attention_heads": 2, "text_dim": 16,
         "num_layers": 2, "rope_dim_list": [4, 6, 6], "theta": 256},
        {"hidden_states": Randn((1, 2, 16, 1, 2, 2)), "encoder_hidden_states": Randn((1, 12, 16)),
         "timestep": _t1(1), "shape_list": Value([[(1, 1, 1), (1, 1, 1)]])},
        _src("test_models_transformer_joyimage_edit_plus", "JoyImageEditPlusTransformerTesterConfig"),
    ),
    CorpusConfig(
        "Krea2Transformer", "Krea2Transformer2DModel",
        {"in_channels": 16, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 32, "timestep_embed_dim": 8, "text_hidden_dim": 16,
         "num_text_layers": 3, "text_num_attention_heads": 2, "text_num_key_value_heads": 1,
         "text_intermediate_size": 16, "num_layerwise_text_blocks": 1, "num_refiner_text_blocks": 1,
         "axes_dims_rope": (4, 2, 2), "rope_theta": 1000.0, "norm_eps": 1e-5},
        {"hidden_states": Randn((1, 4, 16)), "encoder_hidden_states": Randn((1, 4, 3, 16)), "timestep": _t1(1),
         "position_ids": Literal([[0, 0, 0]] * 4 + [[0, h, w] for h in (0, 1) for w in (0, 1)], "float32"),
         "encoder_attention_mask": Literal([[True, True, True, False]], "bool")},
        _src("test_models_transformer_krea2", "Krea2TransformerTesterConfig"),
    ),
    CorpusConfig(
        "LatteTransformer", "LatteTransformer3DModel",
        {"sample_size": 8, "num_layers": 1, "patch_size": 2, "attention_head_dim": 4, "num_attention_heads": 2,
         "caption_channels": 8, "in_channels": 4, "cross_attention_dim": 8, "out_channels": 8,
         "attention_bias": True, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
         "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6},
        {"hidden_states": Randn((2, 4, 1, 8, 8)), "encoder_hidden_states": Randn((2, 8, 8)), "timestep": _ti(2),
         "enable_temporal_attentions": Value(True)},
        _src("test_models_transformer_latte", "LatteTransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "LongCatAudioDiTTransformer", "LongCatAudioDiTTransformer",
        {"dit_dim": 64, "dit_depth": 2, "dit_heads": 4, "dit_text_dim": 32, "latent_dim": 8, "text_conv": False},
        {"hidden_states": Randn((1, 16, 8)), "encoder_hidden_states": Randn((1, 10, 32)),
         "encoder_attention_mask": Ones((1, 10), "bool"), "attention_mask": Ones((1, 16), "bool"),
         "timestep": _t1(1)},
        _src("test_models_transformer_longcat_audio_dit", "LongCatAudioDiTTransformerTesterConfig"),
    ),
    CorpusConfig(
        "LongCatImageTransformer", "LongCatImageTransformer2DModel",
        {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
         "axes_dims_rope": [4, 4, 8]},
        {**_FLUX_LIKE_INPUTS, "guidance": Literal([3.5], "float32")},
        _src("test_models_transformer_longcat_image", "LongCatImageTransformerTesterConfig"),
    ),
    CorpusConfig(
        "LTXTransformer", "LTXVideoTransformer3DModel",
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
         "cross_attention_dim": 16, "num_layers": 1, "qk_norm": "rms_norm_across_heads", "caption_channels": 16},
        {"hidden_states": Randn((2, 512, 4)), "encoder_hidden_states": Randn((2, 16, 16)), "timestep": _ti(2),
         "encoder_attention_mask": Ones((2, 16), "bool"), "num_frames": Value(2), "height": Value(16),
         "width": Value(16)},
        _src("test_models_transformer_ltx", "LTXTransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "LTX2Transformer", "LTX2VideoTransformer3DModel",
        {"in_channels": 4, "out_channels": 4, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 2,
         "attention_head_dim": 8, "cross_attention_dim": 16, "audio_in_channels": 4, "audio_out_channels": 4,
         "audio_num_attention_heads": 2, "audio_attention_head_dim": 4, "audio_cross_attention_dim": 8,
         "num_layers": 2, "qk_norm": "rms_norm_across_heads", "caption_channels": 16, "rope_double_precision": False},
        {"hidden_states": Randn((2, 512, 4)), "audio_hidden_states": Randn((2, 9, 4)),
         "encoder_hidden_states": Randn((2, 16, 16)), "audio_encoder_hidden_states": Randn((2, 16, 16)),
         "timestep": _tf(2), "encoder_attention_mask": Ones((2, 16), "bool"), "num_frames": Value(2),
         "height": Value(16), "width": Value(16), "audio_num_frames": Value(9), "fps": Value(25.0)},
        _src("test_models_transformer_ltx2", "LTX2TransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "LuminaNextDiT", "LuminaNextDiT2DModel",
        {"sample_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 24, "num_layers": 2,
         "num_attention_heads": 3, "num_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": None,
         "norm_eps": 1e-5, "learn_sigma": False, "qk_norm": True, "cross_attention_dim": 32, "scaling_factor": 1.0},
        {"hidden_states": Randn((2, 4, 16, 16)), "encoder_hidden_states": Randn((2, 16, 32)), "timestep": _t1(2),
         "encoder_mask": Randn((2, 16)), "image_rotary_emb": Randn((384, 384, 4)),
         "cross_attention_kwargs": Value({})},
        _src("test_models_transformer_lumina", "LuminaNextDiTTesterConfig"),
    ),
    CorpusConfig(
        "Lumina2Transformer", "Lumina2Transformer2DModel",
        {"sample_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 24, "num_layers": 2,
         "num_refiner_layers": 1, "num_attention_heads": 3, "num_kv_heads": 1, "multiple_of": 2,
         "ffn_dim_multiplier": None, "norm_eps": 1e-5, "scaling_factor": 1.0, "axes_dim_rope": (4, 2, 2),
         "axes_lens": (128, 128, 128), "cap_feat_dim": 32},
        {"hidden_states": Randn((2, 4, 16, 16)), "encoder_hidden_states": Randn((2, 16, 32)), "timestep": _t1(2),
         "encoder_attention_mask": Ones((2, 16), "bool")},
        _src("test_models_transformer_lumina2", "Lumina2TransformerTesterConfig"),
    ),
    CorpusConfig(
        "MiniMaxH3Transformer", "MiniMaxH3Transformer3DModel",
        {"num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 24, "num_layers": 2,
         "num_refiner_layers": 2, "ffn_dim": 32, "in_channels": 4, "audio_in_channels": 6, "patch_size": (1, 2, 2),
         "text_dim": 8, "freq_dim": 8, "time_embed_hidden_dim": 24, "time_embed_dim": 16, "rope_freq_dim": 2},
        {"hidden_states": Randn((2, 8, 16)), "audio_hidden_states": Randn((2, 6, 6)),
         "encoder_hidden_states": Randn((2, 4, 8)), **_minimax_layout()},
        _src("test_models_transformer_minimax_h3", "MiniMaxH3TransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "MiniMaxMusic3Transformer1D", "MiniMaxMusic3Transformer1DModel",
        {"in_channels": 8, "condition_dim": 16, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8,
         "ff_inner_dim": 32, "rotary_dim": 4, "fourier_embedding_dim": 8},
        {"hidden_states": Randn((1, 8, 24)), "encoder_hidden_states": Randn((1, 24, 16)), "timestep": _t1(1)},
        _src("test_models_transformer_minimax_music3", "MiniMaxMusic3Transformer1DTesterConfig"),
    ),
    CorpusConfig(
        "MochiTransformer", "MochiTransformer3DModel",
        {"patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
         "pooled_projection_dim": 16, "in_channels": 4, "out_channels": None, "qk_norm": "rms_norm",
         "text_embed_dim": 16, "time_embed_dim": 4, "activation_fn": "swiglu", "max_sequence_length": 16},
        {"hidden_states": Randn((2, 4, 2, 16, 16)), "encoder_hidden_states": Randn((2, 16, 16)), "timestep": _ti(2),
         "encoder_attention_mask": Ones((2, 16), "bool")},
        _src("test_models_transformer_mochi", "MochiTransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "MotifVideoTransformer", "MotifVideoTransformer3DModel",
        {"in_channels": 33, "out_channels": 16, "num_attention_heads": 2, "attention_head_dim": 12, "num_layers": 1,
         "num_single_layers": 1, "num_decoder_layers": 0, "mlp_ratio": 4.0, "patch_size": 1, "patch_size_t": 1,
         "qk_norm": "rms_norm", "norm_type": "layer_norm", "text_embed_dim": 32, "image_embed_dim": 4,
         "rope_theta": 256.0, "rope_axes_dim": (4, 4, 4), "enable_text_cross_attention_dual": False,
         "enable_text_cross_attention_single": False},
        {"hidden_states": Randn((1, 33, 9, 16, 16)), "encoder_hidden_states": Randn((1, 12, 32)), "timestep": _ti(1)},
        _src("test_models_transformer_motif_video", "MotifVideoTransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "NucleusMoEImageTransformer", "NucleusMoEImageTransformer2DModel",
        {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
         "num_attention_heads": 4, "joint_attention_dim": 16, "axes_dims_rope": (8, 4, 4), "moe_enabled": False,
         "capacity_factors": [8.0, 8.0]},
        {"hidden_states": Randn((1, 16, 16)), "encoder_hidden_states": Randn((1, 8, 16)),
         "encoder_hidden_states_mask": Ones((1, 8), "int64"), "timestep": _t1(1), "img_shapes": Value([(1, 4, 4)])},
        _src("test_models_transformer_nucleusmoe_image", "NucleusMoEImageTransformerTesterConfig"),
    ),
    CorpusConfig(
        "OmniGenTransformer", "OmniGenTransformer2DModel",
        {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 32,
         "num_layers": 20, "pad_token_id": 0, "vocab_size": 1000, "in_channels": 4, "time_step_dim": 4,
         "rope_scaling": {"long_factor": [1, 2], "short_factor": [1, 2]}},
        {"hidden_states": Randn((2, 4, 8, 8)), "timestep": _t1(2), "input_ids": Randint(0, 10, (2, 24)),
         "input_img_latents": ListOf((Randn((1, 4, 8, 8)),)), "input_image_sizes": Value({0: [[0, 16]]}),
         "attention_mask": Ones((2, 41, 41)), "position_ids": Literal([list(range(41))] * 2)},
        _src("test_models_transformer_omnigen", "OmniGenTransformerTesterConfig"),
    ),
    CorpusConfig(
        "OvisImageTransformer", "OvisImageTransformer2DModel",
        {"patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 1,
         "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (4, 4, 8)},
        dict(_FLUX_LIKE_INPUTS),
        _src("test_models_transformer_ovis_image", "OvisImageTransformerTesterConfig"),
    ),
    CorpusConfig(
        "PRXTransformer", "PRXTransformer2DModel",
        {"in_channels": 16, "patch_size": 2, "context_in_dim": 1792, "hidden_size": 1792, "mlp_ratio": 3.5,
         "num_heads": 28, "depth": 4, "axes_dim": [32, 32], "theta": 10000},
        {"hidden_states": Randn((1, 16, 16, 16)), "encoder_hidden_states": Randn((1, 16, 1792)), "timestep": _t1(1)},
        _src("test_models_transformer_prx", "PRXTransformerTesterConfig"),
        notes=("not tiny: hidden size 1792, 4 blocks (~0.9 GB of float32 weights)",),
    ),
    CorpusConfig(
        "QwenImageTransformer", "QwenImageTransformer2DModel",
        {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
         "num_attention_heads": 4, "joint_attention_dim": 16, "guidance_embeds": False, "axes_dims_rope": (8, 4, 4)},
        {"hidden_states": Randn((1, 16, 16)), "encoder_hidden_states": Randn((1, 8, 16)),
         "encoder_hidden_states_mask": Ones((1, 8), "int64"), "timestep": _t1(1), "img_shapes": Value([(1, 4, 4)])},
        _src("test_models_transformer_qwenimage", "QwenImageTransformerTesterConfig"),
    ),
    CorpusConfig(
        "SanaTransformer", "SanaTransformer2DModel",
        {"patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 1, "attention_head_dim": 4,
         "num_attention_heads": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 4,
         "cross_attention_dim": 8, "caption_channels": 8, "sample_size": 32},
        {"hidden_states": Randn((2, 4, 32, 32)), "encoder_hidden_states": Randn((2, 8, 8)), "timestep": _ti(2)},
        _src("test_models_transformer_sana", "SanaTransformerTesterConfig"),
    ),
    CorpusConfig(
        "SanaVideoTransformer3D", "SanaVideoTransformer3DModel",
        {"in_channels": 16, "out_channels": 16, "num_attention_heads": 2, "attention_head_dim": 12, "num_layers": 2,
         "num_cross_attention_heads": 2, "cross_attention_head_dim": 12, "cross_attention_dim": 24,
         "caption_channels": 16, "mlp_ratio": 2.5, "dropout": 0.0, "attention_bias": False, "sample_size": 8,
         "patch_size": (1, 2, 2), "norm_elementwise_affine": False, "norm_eps": 1e-6,
         "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32},
        {"hidden_states": Randn((1, 16, 2, 16, 16)), "encoder_hidden_states": Randn((1, 12, 16)), "timestep": _ti(1)},
        _src("test_models_transformer_sana_video", "SanaVideoTransformer3DTesterConfig"), video=True,
    ),
    CorpusConfig(
        "SD3Transformer", "SD3Transformer2DModel",
        {**_SD3, "dual_attention_layers": (), "qk_norm": None},
        {"hidden_states": Randn((2, 4, 32, 32)), "encoder_hidden_states": Randn((2, 154, 32)),
         "pooled_projections": Randn((2, 64)), "timestep": _ti(2)},
        _src("test_models_transformer_sd3", "SD3TransformerTesterConfig"),
    ),
    CorpusConfig(
        "SD35Transformer", "SD3Transformer2DModel",
        {**_SD3, "dual_attention_layers": (0,), "qk_norm": "rms_norm"},
        {"hidden_states": Randn((2, 4, 32, 32)), "encoder_hidden_states": Randn((2, 154, 32)),
         "pooled_projections": Randn((2, 64)), "timestep": _ti(2)},
        _src("test_models_transformer_sd3", "SD35TransformerTesterConfig"),
    ),
    CorpusConfig(
        "SkyReelsV2Transformer", "SkyReelsV2Transformer3DModel", dict(_WAN),
        {"hidden_states": Randn((1, 4, 2, 16, 16)), "encoder_hidden_states": Randn((1, 12, 16)), "timestep": _ti(1)},
        _src("test_models_transformer_skyreels_v2", "SkyReelsV2TransformerTesterConfig"), video=True,
    ),
    CorpusConfig(
        "StableAudio3DiT", "StableAudio3DiTModel",
        {"io_channels": 8, "patch_size": 1, "embed_dim": 32, "depth": 2, "num_heads": 4, "cond_token_dim": 16,
         "global_cond_dim": 12, "local_add_cond_dim": 5, "timestep_features_dim": 16, "ff_mult": 2,
         "num_memory_tokens": 3, "use_differential_attention": False},
        {"hidden_states": Randn((2, 8, 16)), "timestep": _t1(2), "encoder_hidden_states": Randn((2, 4, 16)),
         "global_hidden_states": Randn((2, 12))},
        _src("test_models_transformer_stable_audio3", "StableAudio3DiTTesterConfig"),
    ),
    CorpusConfig(
        "TemporalTransformer", "TransformerTemporalModel",
        {"num_attention_heads": 8, "attention_head_dim": 4, "in_channels": 4, "num_layers": 1, "norm_num_groups": 1},
        {"hidden_states": Randn((2, 4, 32, 32)), "timestep": _ti(2)},
        _src("test_models_transformer_temporal", "TemporalTransformerTesterConfig"),
        notes=("a UNet's temporal layer, not a DiT; its output ignores the timestep",),
    ),
    CorpusConfig(
        "WanTransformer3D", "WanTransformer3DModel", dict(_WAN),
        {"hidden_states": Randn((1, 4, 2, 16, 16)), "encoder_hidden_states": Randn((1, 12, 16)), "timestep": _ti(1)},
        _src("test_models_transformer_wan", "WanTransformer3DTesterConfig"), video=True,
    ),
    CorpusConfig(
        "WanAnimateTransformer3D", "WanAnimateTransformer3DModel",
        {**_WAN, "in_channels": 12, "latent_channels": 4, "image_dim": 16,
         "motion_encoder_channel_sizes": {"4": 16, "8": 16, "16": 16}, "motion_encoder_size": 16,
         "motion_style_dim": 8, "motion_dim": 4, "motion_encoder_dim": 16, "face_encoder_hidden_dim": 16,
         "face_encoder_num_heads": 2, "inject_face_latents_blocks": 2},
        {"hidden_states": Randn((1, 12, 21, 16, 16)), "timestep": _ti(1), "encoder_hidden_states": Randn((1, 12, 16)),
         "encoder_hidden_states_image": Randn((1, 12, 16)), "pose_hidden_states": Randn((1, 4, 20, 16, 16)),
         "face_pixel_values": Randn((1, 3, 77, 16, 16))},
        _src("test_models_transformer_wan_animate", "WanAnimateTransformer3DTesterConfig"), video=True,
    ),
    CorpusConfig(
        "WanAnimate2Transformer", "WanAnimate2Transformer3DModel",
        {"patch_size": (1, 2, 2), "text_len": 16, "in_dim": 36, "dim": 128, "ffn_dim": 256, "freq_dim": 64,
         "text_dim": 32, "out_dim": 16, "num_heads": 4, "num_layers": 2, "cross_attn_norm": True,
         "use_img_emb": True},
        {"hidden_states": ListOf((Randn((16, 2, 4, 4)),)), "timestep": _t1(1),
         "encoder_hidden_states": ListOf((Randn((8, 32)),)), "condition_latents": ListOf((Randn((20, 2, 4, 4)),)),
         "encoder_hidden_states_image": Randn((1, 4, 1280)),
         "kv_cache": Construct("diffusers.models.transformers.transformer_wan_animate_2:WanAnimate2KVCache", (2,)),
         "kv_cache_mode": Value("extract"), "seq_len": Value(8), "offset_grid_sizes": Literal([[2, 2, 2]])},
        _src("test_models_transformer_wan_animate_2", "WanAnimate2TransformerTesterConfig"), video=True,
        notes=("the reference pass: the model writes every layer's K/V into the KV-cache object passed in",),
    ),
    CorpusConfig(
        "WanVACETransformer3D", "WanVACETransformer3DModel",
        {**_WAN, "in_channels": 16, "out_channels": 16, "text_dim": 32, "num_layers": 4, "vace_layers": [0, 2],
         "vace_in_channels": 48},
        {"hidden_states": Randn((1, 16, 2, 16, 16)), "encoder_hidden_states": Randn((1, 12, 32)),
         "control_hidden_states": Randn((1, 48, 2, 16, 16)), "timestep": _ti(1)},
        _src("test_models_transformer_wan_vace", "WanVACETransformer3DTesterConfig"), video=True,
    ),
    CorpusConfig(
        "ZImageTransformer", "ZImageTransformer2DModel",
        {"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 16, "n_layers": 1,
         "n_refiner_layers": 1, "n_heads": 1, "n_kv_heads": 2, "qk_norm": True, "cap_feat_dim": 16,
         "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [8, 4, 4], "axes_lens": [256, 32, 32]},
        {"x": ListOf((Randn((16, 1, 16, 16)),)), "cap_feats": ListOf((Randn((16, 16)),)), "t": _t1(1)},
        _src("test_models_transformer_z_image", "ZImageTransformerTesterConfig"), timestep="t",
        notes=("the test's timestep is 0; here it follows the schedule",),
    ),
    CorpusConfig(
        "Kandinsky5T2V", "Kandinsky5Transformer3DModel",
        {"in_visual_dim": 16, "in_text_dim": 32, "in_text_dim2": 16, "time_dim": 16, "out_visual_dim": 16,
         "patch_size": (1, 2, 2), "model_dim": 16, "ff_dim": 32, "num_text_blocks": 1, "num_visual_blocks": 2,
         "axes_dims": (1, 1, 2), "visual_cond": False, "attention_type": "regular"},
        # 32x32 pixels, 5 frames: 2 latent frames of 4x4 (VAE 8x spatial, 4x temporal), channels last;
        # 8 text tokens (max_sequence_length), Qwen hidden 32, CLIP pooled 16
        {"hidden_states": Randn((1, 2, 4, 4, 16)), "encoder_hidden_states": Randn((1, 8, 32)),
         "timestep": _tf(1), "pooled_projections": Randn((1, 16)),
         "visual_rope_pos": ListOf((Arange(0, 2), Arange(0, 2), Arange(0, 2))), "text_rope_pos": Arange(0, 8),
         "scale_factor": Value((1, 3.16, 3.16)), "sparse_params": Value(None)},
        "tests/pipelines/kandinsky5/test_kandinsky5.py::Kandinsky5T2VPipelineFastTests (transformer and the "
        "inputs pipeline_kandinsky.py hands it)", video=True,
    ),
)

BY_NAME: dict[str, CorpusConfig] = {c.name: c for c in CONFIGS}
assert len(BY_NAME) == len(CONFIGS), "configuration names must be unique"


def select(only: list[str] | None = None, video: bool = False) -> list[CorpusConfig]:
    """The configurations whose name or class contains one of ``only`` (case-insensitive; all when
    empty), video classes only with ``video=True``."""
    chosen = []
    for config in CONFIGS:
        if video and not config.video:
            continue
        if only and not any(o.lower() in config.name.lower() or o.lower() == config.cls.lower() for o in only):
            continue
        chosen.append(config)
    return chosen
