"""``evaluate:``: the paper's Table 1 run and the scorers it needs (the frame classifier, the
BLIP-2 captioner)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from storygpt.config.base import Section
from storygpt.config.stages import ActorPoolConfig


class ClassifierConfig(Section):
    """`storygpt train-classifier`: the Inception-v3 that scores frames (Char-/BG-Acc and -F1)."""

    output: str = Field(description="where the fine-tuned classifier is saved and read; '{work_dir}' is substituted")
    weights: str | None = Field(
        default=None, description="ImageNet Inception-v3 state dict to fine-tune (.safetensors, or torchvision's .pth "
                                  "read with weights_only=True); null: random init (tiny)")
    image_size: int = Field(ge=75, description="input side; Inception-v3 needs >= 75 (299 for ImageNet weights)")
    batch_size: int = Field(ge=1)
    max_steps: int = Field(ge=1)
    learning_rate: float = Field(gt=0)


class CaptionerConfig(Section):
    """The BLIP-2 captioner behind BLEU4 / CIDEr: a fine-tuned BLIP-2 the user supplies, or (tiny)
    a small BLIP-2 that `storygpt train-captioner` builds and trains on the story world."""

    model: str = Field(description="BLIP-2 dir (save_pretrained layout); '{work_dir}' is substituted")
    max_new_tokens: int = Field(ge=1)
    num_beams: int = Field(default=5, ge=1, description="beam width of every caption (LAVIS's BLIP-2 default, "
                                                         "which the official evaluation used); 1: greedy")
    references: int = Field(default=5, ge=1, description="captions of each ground-truth frame (its best beams): "
                                                          "the references a generated frame's caption is scored "
                                                          "against for BLEU4 / CIDEr (the paper: five)")
    batch_size: int = Field(ge=1, description="train-captioner: frames per step")
    max_steps: int = Field(ge=1, description="train-captioner: optimizer steps")
    learning_rate: float = Field(gt=0)


class EvaluateConfig(Section):
    """`storygpt evaluate`: generate the split's stories and score them (paper Table 1)."""

    output: str = Field(description="generated frames, scores and table.md; '{work_dir}' is substituted")
    split: Literal["val", "test"]
    rows: list[Literal["char_ldm/original", "char_ldm/referential", "storygpt/referential", "storygpt/original"]] = Field(
        min_length=1, description="method/captions: Char-LDM alone, or StoryGPT-V (aligner + Char-LDM)")
    max_stories: int | None = Field(default=None, ge=1, description="score the first N stories; null: all")
    story_frames: int | None = Field(default=None, ge=1, description="frames per story; null: data.frames_per_story")
    long_story_frames: list[int] = Field(description="long-story runs: consecutive stories chained to N frames")
    long_stories: int = Field(ge=0, description="long stories per length (0: skip the long-story runs)")
    sample_steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=1)
    first_frame: Literal["char_ldm", "llm"] = Field(
        default="char_ldm", description="who draws a StoryGPT-V story's frame 1, which has nothing earlier to "
                                        "resolve: the Char-LDM with the reference images (the official "
                                        "evaluation) or the LM like every later frame (the paper's text)")
    detector_tolerance: int = Field(ge=0, le=255, description="story world: the colour detector's L-inf tolerance")
    fid_weights: str | None = Field(
        default=None, description="torch-fidelity's FID Inception weights (pt_inception-2015-12-05); null: the "
                                  "fine-tuned classifier's pooled features (not comparable with published FIDs)")
    pool: ActorPoolConfig
    classifier: ClassifierConfig
    captioner: CaptionerConfig
