"""``models:`` and ``zoo:``: where the pretrained parts live, whose licence they carry, and the
sizes of the random tiny models that stand in for them."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from storygpt.config.base import Section

PART = Literal["clip_text", "clip_vision", "vae", "unet", "scheduler", "lm", "sam", "super_resolution"]
FrozenDtype = Literal["fp32", "bf16", "fp16"]


class ModelSource(Section):
    """Where pretrained parts come from and under which licence: every export's model card names them."""

    name: str = Field(description="e.g. stable-diffusion-v1-5")
    license: str = Field(description="the licence the weights are published under")
    url: str | None = None
    parts: list[PART] = Field(min_length=1, description="the models.* parts taken from it")
    note: str | None = Field(default=None, description="what the licence asks of derivatives")


class ModelPaths(Section):
    """Local weight directories, one per pretrained part; '{work_dir}' is substituted."""

    clip_text: str
    clip_vision: str
    vae: str
    unet: str
    scheduler: str
    lm: str
    sam: str
    super_resolution: str
    frozen_dtype: FrozenDtype = Field(
        default="fp32", description="the dtype the frozen parts are loaded and kept in (the LM, the CLIP towers' "
                                    "frozen layers, the VAE; at inference the whole Char-LDM); trained parts stay fp32")
    char_ldm: str | None = Field(default=None, description="trained Char-LDM (train-ldm's export); null: the latest")
    aligner: str | None = Field(default=None, description="trained aligner (train-aligner's export); null: the latest")
    sources: list[ModelSource] = Field(
        default_factory=list, description="provenance and licences of the parts above (the exports' model cards)")

    NOT_PATHS: ClassVar[tuple[str, ...]] = ("frozen_dtype", "sources")

    def paths(self) -> dict[str, str | None]:
        """The fields that name a directory: every field but ``NOT_PATHS`` (None: not set)."""
        return {name: getattr(self, name) for name in type(self).model_fields if name not in self.NOT_PATHS}


class TinyZooConfig(Section):
    """Sizes of the random tiny models ``storygpt zoo`` builds (tests and quickstart)."""

    tokenizer_vocab_size: int = Field(ge=300)
    clip_hidden_size: int
    clip_layers: int
    clip_heads: int
    clip_projection_dim: int
    vision_image_size: int
    vision_patch_size: int
    vae_block_out_channels: list[int]
    vae_latent_channels: int
    unet_sample_size: int
    unet_block_out_channels: list[int] = Field(min_length=4, max_length=4)
    unet_layers_per_block: int
    unet_attention_head_dim: int
    lm_hidden_size: int
    lm_layers: int
    lm_heads: int
    lm_ffn_dim: int
    lm_max_positions: int
    lm_pretrain_steps: int = Field(ge=0, description="next-token steps on world stories: the frozen LM must know the language")
    vae_pretrain_steps: int = Field(
        ge=0, description="reconstruction steps on rendered world frames: a random VAE cannot decode what the UNet learns")
    scheduler_prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    scheduler_zero_terminal_snr: bool = Field(
        default=False, description="SD-1.5's schedule rescaled to zero SNR at t=T, sampled from t=T "
                                   "(Lin et al. 2024): the last step is pure noise, so only the caption can set the scene")
    sam_image_size: int
    sam_embed_dim: int
    sam_depth: int
    sam_heads: int
    sr_block_out_channels: list[int]
    sr_vq_channels: list[int]
