"""``data:``: which dataset layout and character table a run reads, and the story world's size."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from storygpt.config.base import Section

DatasetFormat = Literal["flintstones", "storygptv", "pororo"]
Dataset = Literal["world", "flintstones", "pororo"]
# The character table a layout's own release uses (StoryGPT-V's layout is FlintstonesSV's). A
# command given --format without --dataset reads with this table: the story world is also written
# in the FlintstonesSV layout, but only its own preset says `dataset: world`.
DATASET_OF_FORMAT: dict[str, Dataset] = {"flintstones": "flintstones", "storygptv": "flintstones", "pororo": "pororo"}


class WorldConfig(Section):
    """The procedural story world (the embedded default dataset)."""

    stories: int = Field(gt=0)
    seed: int
    image_size: int = Field(ge=64)
    clip_frames: int = Field(ge=1, description="sampled frames stacked per clip .npy")
    val_fraction: float = Field(ge=0, lt=1)
    test_fraction: float = Field(ge=0, lt=1)


class DataConfig(Section):
    format: DatasetFormat
    dataset: Dataset = Field(
        description="character table (names, genders, label order) the corpus uses"
    )
    root: str = Field(description="dataset directory; '{work_dir}' is substituted")
    split: Literal["train", "val", "test"]
    clip_frame: int = Field(ge=0, description="which sampled frame of a clip (.npy / PNG strip)")
    frames_per_story: int = Field(ge=2)
    box_source_size: tuple[int, int] | None = Field(
        default=None, description="(W, H) the annotation boxes are expressed in; null = frame pixels"
    )
    on_error: Literal["raise", "skip"] = Field(
        description="bad input: raise naming file and id, or skip and count it in the report"
    )
    referential_rule: Literal["equal", "subset"] = Field(
        description="which frames get pronouns (storygpt.data.referential): 'equal', the cast equals the "
                    "tracked set (the reference loaders, the paper's numbers); 'subset', Algorithm 1's text")
    world: WorldConfig | None = None
