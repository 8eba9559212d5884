"""Checks a frame must pass before it becomes a training record (preprocessing's validate stage).

A problem either drops the whole frame (no usable image or caption) or only what it concerns
(a box, an unknown character); either way it is reported, never silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from storygpt.data.records import Box


@dataclass(frozen=True)
class Problem:
    stage: str
    reason: str
    dropped: Literal["frame", "box", "character"]


def check_box(box: Box, width: int, height: int) -> tuple[Box | None, str | None]:
    """(box clipped to the image, None) or (None, why it is unusable)."""
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        return None, f"box {list(box)} is not 4 finite numbers"
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return None, f"box {list(box)} has zero area"
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if cx1 <= cx0 or cy1 <= cy0:
        return None, f"box {list(box)} lies outside the {width}x{height} image"
    return (cx0, cy0, cx1, cy1), None


def scale_boxes(boxes: list[Box | None], source: int, target: int) -> list[Box | None]:
    s = target / source
    return [None if b is None else tuple(v * s for v in b) for b in boxes]
