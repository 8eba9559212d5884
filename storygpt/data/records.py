"""The one record type every reader yields and every stage reads.

Boxes are ``(x0, y0, x1, y1)`` in pixels of the frame as stored (128 px for the raw datasets).
Images and masks are not loaded by the readers: a frame carries *where* they are
(:class:`ImageSource`, :class:`MaskSource`) so a cluster job can load them where it runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ImageSource:
    """Where a frame's pixels are: a stacked ``.npy`` clip or a vertical PNG strip."""

    kind: Literal["npy_clip", "png_strip"]
    path: str
    clip_frame: int


@dataclass(frozen=True)
class MaskSource:
    """A segment-id map (value v = segment v, 0 = background), one per character in order."""

    kind: Literal["segment_map_clip", "segment_map"]
    path: str
    clip_frame: int
    segment_ids: tuple[int | None, ...]  # per character; None: that character has no mask


@dataclass
class Frame:
    id: str
    story_id: str
    index: int
    caption: str
    characters: list[str]  # the dataset table's display names, in annotation order
    boxes: list[Box | None]  # aligned with characters
    setting: str | None
    image: ImageSource
    masks: MaskSource | None = None
    referential_caption: str | None = None
    captions: list[str] = field(default_factory=list)  # every caption the source has
    unknown_characters: list[str] = field(default_factory=list)  # labels not in the table

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Story:
    story_id: str
    frames: list[Frame]


@dataclass
class Skip:
    id: str
    file: str
    reason: str


@dataclass
class ReadReport:
    """What a reader did; a skip is counted and kept here, never dropped silently."""

    dataset: str
    stories: int = 0
    frames: int = 0
    skipped: list[Skip] = field(default_factory=list)
    unknown_characters: dict[str, int] = field(default_factory=dict)  # label -> count

    def summary(self) -> dict:
        return {
            "dataset": self.dataset,
            "stories": self.stories,
            "frames": self.frames,
            "skipped": len(self.skipped),
            "skip_reasons": [asdict(s) for s in self.skipped[:20]],
            "unknown_characters": self.unknown_characters,
        }
