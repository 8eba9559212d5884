"""The pipeline's stages in run order: ``preprocess:`` (frames -> records), ``char_ldm:``
(stage 1), ``precompute:`` and ``aligner:`` (stage 2). The method hyperparameters have no
defaults, so a preset that forgets one fails loudly."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from storygpt.config.base import Section, _ordered


# ----------------------------------------------------------------------------- preprocessing
class ActorPoolConfig(Section):
    """An autoscaling Ray Data actor pool."""

    min_actors: int = Field(ge=1)
    max_actors: int = Field(ge=1)
    num_cpus: float = Field(gt=0)
    num_gpus: float = Field(ge=0)
    batch_size: int = Field(ge=1)
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources per actor, e.g. {gpu_1x_worker: 0.5}: the node type")

    @model_validator(mode="after")
    def _min_le_max(self) -> "ActorPoolConfig":
        return _ordered(self, "min_actors", "max_actors")


class SuperResolutionStageConfig(Section):
    backend: Literal["ldm", "resize"] = Field(description="ldm: models.super_resolution; resize: Lanczos")
    steps: int = Field(ge=1, description="denoising steps of the LDM upscaler")
    pool: ActorPoolConfig


class MaskStageConfig(Section):
    backend: Literal["sam", "box"] = Field(description="sam: models.sam prompted with boxes; box: mask = box")
    prefer_dataset_masks: bool = Field(description="use masks the dataset ships (world, StoryGPT-V layout)")
    pool: ActorPoolConfig


class PreprocessConfig(Section):
    """Frames -> records at ``char_ldm.resolution``."""

    splits: list[Literal["train", "val", "test"]] = Field(min_length=1)
    output: str = Field(description="records dir; '{work_dir}' is substituted")
    rows_per_file: int = Field(ge=1, description="frames per Parquet file (the unit of resume)")
    task_num_cpus: float = Field(gt=0, description="CPUs of a load/validate or write task")
    torch_threads: int = Field(ge=1, description="intra-op threads per actor")
    super_resolution: SuperResolutionStageConfig
    masks: MaskStageConfig


# ----------------------------------------------------------------------------- both stages
class OptimizationConfig(Section):
    """What both training stages set the same way: the AdamW rate and its schedule
    (``storygpt.training.stage_lr_lambda``), the batch, the length of the run, the precision."""

    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(ge=0, description="linear LR warm-up, then lr_schedule")
    lr_schedule: Literal["constant", "cosine"] = Field(default="constant", description="after warm-up: "
                                                       "constant, or a cosine decay to 0 at max_steps")
    weight_decay: float = Field(ge=0)
    batch_size: int = Field(gt=0, description="global batch (all workers, before accumulation)")
    max_steps: int = Field(gt=0)
    mixed_precision: Literal["no", "bf16"]
    log_every: int = Field(ge=1, description="steps between metric logs")


# ----------------------------------------------------------------------------- stage 1
class CharLDMConfig(OptimizationConfig):
    resolution: int
    max_characters: int = Field(ge=1)
    trainable_vision_layers: int = Field(ge=0)
    lreg_weight: float = Field(ge=0)
    lreg_blocks: list[str] = Field(min_length=1)
    p_unconditional: float = Field(ge=0, le=1)
    p_text_only: float = Field(ge=0, le=1)
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        description="what the UNet predicts; must be models.scheduler's prediction_type")
    snr_gamma: float | None = Field(gt=0, description="Min-SNR-gamma loss weighting; null: plain MSE (the paper)")
    sample_steps: int = Field(gt=0)
    guidance_scale: float = Field(ge=1)
    sampler: Literal["ddim", "pndm"]
    delayed_conditioning: float = Field(ge=0, le=1, description=(
        "share of the sampling steps conditioned on the plain caption (no fusion, no LM) before the fused or "
        "the LM's conditioning takes over; 0: the paper's text; the official code uses 0.5"))
    sample_every: int = Field(ge=1, description="steps between sample grids + attention maps")

    @model_validator(mode="after")
    def _schedule_sums_to_at_most_one(self) -> "CharLDMConfig":
        if self.p_unconditional + self.p_text_only > 1:
            raise ValueError("p_unconditional + p_text_only must be <= 1 (the rest is fused)")
        return self


# ----------------------------------------------------------------------------- stage 2
class AlignerConfig(OptimizationConfig):
    lm_family: Literal["opt", "llama"]
    visual_tokens: int = Field(ge=1, description="m: LM-space tokens per frame")
    interleave: bool = Field(
        default=True, description="the LM reads earlier frames' images between the captions (eq. 5); false: "
                                  "captions only (the paper's 'Caption-' ablation, Table 7)")
    img_tokens: int = Field(ge=1, description="R: [IMG] tokens")
    mapper_dim: int
    mapper_encoder_layers: int
    mapper_decoder_layers: int
    mapper_heads: int
    mapper_ffn_dim: int
    mapper_queries: int = Field(description="L: learnable queries (77 = CLIP text length)")
    max_length: int = Field(description="longest training sequence (tokens); earliest frames are dropped")
    gen_loss_weight: float = Field(
        default=1.0, ge=0, description="λ in loss = λ·L_gen + L_align (the paper: 1; storygpt/aligner/losses.py)"
    )
    eval_every: int = Field(ge=1, description="steps between reference-accuracy evals (and at the last step)")
    eval_frames: int = Field(ge=1, description="held-out pronoun frames scored for reference accuracy")
    context_window: int | None = Field(
        default=None, ge=32, description="tokens the story loop keeps in the KV cache; null: the LM's context"
    )
    caption_max_tokens: int = Field(ge=1, description="continuation: the longest caption the LM may write")


class PrecomputeConfig(Section):
    """Stage-2 targets: each frame's fused embedding and CLIP frame feature, beside its record."""

    output: str = Field(description="dir of the fused-embedding table; '{work_dir}' is substituted")
    target: Literal["fused", "text"] = Field(
        default="fused", description="what L_align regresses: the fused embedding (the method) or the caption's "
                                     "plain CLIP states (the paper's 'Emb text' ablation, Table 4)")
    pool: ActorPoolConfig
