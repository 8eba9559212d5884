"""What the readers share: their options, strict file loading, box scaling, character resolution."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storygpt.data.characters import CharacterTable
from storygpt.data.errors import DatasetError
from storygpt.data.images import npy_clip_shape
from storygpt.data.records import Box, ReadReport


@dataclass(frozen=True)
class ReadOptions:
    split: str = "train"
    frames_per_story: int = 5
    clip_frame: int = 0
    box_source_size: tuple[int, int] | None = None
    on_error: str = "raise"
    limit: int | None = None  # stop after this many stories
    referential_rule: str = "equal"  # storygpt.data.referential.RULES
    # False: leave image files unchecked here; preprocessing checks each frame where it loads it,
    # so one bad frame becomes one error row instead of costing its whole story.
    check_files: bool = True


def require(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(str(path), None, "required file is missing")
    return path


def read_json(path: Path) -> Any:
    try:
        return json.loads(require(path).read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(str(path), None, f"not valid JSON: {err}") from None


def read_pickle(path: Path) -> Any:
    # The datasets ship pickles; only open ones you downloaded from the dataset's authors.
    try:
        with open(require(path), "rb") as fh:
            return pickle.load(fh)
    except (pickle.UnpicklingError, EOFError) as err:
        raise DatasetError(str(path), None, f"not a valid pickle: {err}") from None


def read_npy_object(path: Path) -> Any:
    try:
        value = np.load(require(path), allow_pickle=True, encoding="latin1")
    except (ValueError, OSError) as err:
        raise DatasetError(str(path), None, f"not a valid .npy: {err}") from None
    return value.item() if value.dtype == object and value.shape == () else value


def split_ids(split_file: Path, split: str) -> list:
    splits = read_json(split_file)
    if not isinstance(splits, dict) or split not in splits:
        keys = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
        raise DatasetError(str(split_file), None, f"expected a '{split}' list, found {keys}")
    return list(splits[split])


def clip_problem(path: Path, clip_frame: int, size: int | None = None) -> str | None:
    """Why a stacked clip ``.npy`` is unusable, or None. ``size``: expected frame side."""
    if not path.is_file():
        return "frame file is missing"
    try:
        shape = npy_clip_shape(path)
    except (ValueError, OSError) as err:
        return f"unreadable .npy: {err}"
    frame = shape[1:] if len(shape) == 4 else shape
    if len(frame) != 3 or frame[2] != 3 or frame[0] != frame[1]:
        return f"expected (T, H, W, 3) or (H, W, 3) square frames, got {shape}"
    if size is not None and frame[0] != size:
        return f"expected {size}x{size} frames, got {frame[0]}x{frame[1]}"
    if len(shape) == 4 and clip_frame >= shape[0]:
        return f"clip_frame {clip_frame} out of range: the clip has {shape[0]} frames"
    return None


class BoxFrameCheck:
    """Whether the annotation boxes are in the coordinate frame ``data.box_source_size`` declares
    (null: the stored frame's pixels), checked over a whole read rather than assumed: a wrong
    frame misplaces every box, mask, crop and L_reg target silently. A box reaching more than
    ``OVERHANG`` of the side past its frame counts against it; one stray box is an annotation
    error that validation drops, but when more than ``SHARE`` of all boxes do, the declared frame
    is wrong and the read stops with an error naming the key, whatever ``on_error`` says."""

    OVERHANG = 0.1  # annotators' boxes spill a little past the border; a 640x480 box in 128 px, 5x
    SHARE = 0.1

    def __init__(self, source: tuple[int, int] | None):
        self.source, self.seen, self.beyond, self.example = source, 0, 0, None

    def see(self, box: Box, frame_size: int | None, item_id: str) -> None:
        if frame_size is None:
            return
        self.seen += 1
        margin = frame_size * self.OVERHANG
        if max(box) > frame_size + margin or min(box) < -margin:
            self.beyond += 1
            self.example = self.example or (item_id, box, frame_size)

    def verdict(self, file: str) -> None:
        if self.beyond <= self.SHARE * self.seen:
            return
        item_id, box, frame_size = self.example
        declared = f"{list(self.source)}" if self.source else "null (the stored frame's pixels)"
        raise DatasetError(file, item_id, f"{self.beyond} of {self.seen} boxes reach beyond their {frame_size}-px "
                                          f"frame (e.g. {[round(v, 1) for v in box]}) under data.box_source_size: "
                                          f"{declared}; set data.box_source_size to the [width, height] the "
                                          "annotation's boxes are relative to")


def scale_box(box: list[float], source: tuple[int, int] | None, frame_size: int | None) -> Box:
    x0, y0, x1, y1 = (float(v) for v in box)
    if source is not None and frame_size is not None:
        sx, sy = frame_size / source[0], frame_size / source[1]
        x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
    return (x0, y0, x1, y1)


def resolve_character(label: str, table: CharacterTable, report: ReadReport, unknown: list[str]) -> str | None:
    """The table name for an annotation label; an unknown label is counted and kept aside."""
    char = table.get(label)
    if char is None:
        report.unknown_characters[label] = report.unknown_characters.get(label, 0) + 1
        unknown.append(label)
        return None
    return char.name


def frame_size(path: Path) -> int | None:
    """Side of the stored frames of a clip, or None when the file cannot tell."""
    try:
        return npy_clip_shape(path)[-2]
    except (ValueError, OSError):
        return None
