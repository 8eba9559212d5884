"""SAM of any size from segment_anything's own modules, stored as config.json + safetensors.

segment_anything only builds the three official 1024-px sizes; :func:`build_sam` is its
``_build_sam`` with every size a parameter, so a tiny random SAM runs through the same
``SamPredictor`` code as the real one (the predictor follows ``image_encoder.img_size``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_model
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "segment_anything"  # config.json's marker; transformers' own SAM format says "sam"


@dataclass(frozen=True)
class SamArchitecture:
    """What ``config.json`` records; the defaults are the official ones (ViT-B/L/H share them)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256

    @classmethod
    def read(cls, directory: Path) -> "SamArchitecture":
        fields = json.loads((directory / CONFIG_FILE).read_text())
        del fields["model_type"]
        fields["encoder_global_attn_indexes"] = tuple(fields["encoder_global_attn_indexes"])
        return cls(**fields)


def build_sam(arch: SamArchitecture) -> Sam:
    """A randomly initialised SAM in eval mode."""
    grid = arch.image_size // arch.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def save_sam(sam: Sam, arch: SamArchitecture, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPE, **asdict(arch)}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_model(sam, str(directory / WEIGHTS_FILE))
