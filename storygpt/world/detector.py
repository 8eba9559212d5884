"""An exact colour detector for the story world: which characters, which setting.

Each character has its own saturated colour, so a frame contains a character when enough
pixels lie within ``tolerance`` (L-infinity) of that colour. The setting is the one whose
(sky, ground) colours are nearest the frame's top and bottom rows. Ground truth frames are
scored exactly; generated frames need ``tolerance`` to absorb the model's colour error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storygpt.world.cast import LOOKS, SETTINGS


@dataclass(frozen=True)
class Detection:
    characters: list[str]
    setting: str


def detect(image: np.ndarray, tolerance: int = 40, min_fraction: float = 0.01) -> Detection:
    """``image``: (H, W, 3) uint8. A character needs ``min_fraction`` of the pixels."""
    pixels = image.reshape(-1, 3).astype(np.int16)
    need = max(int(min_fraction * len(pixels)), 1)
    present = [
        name for name, look in LOOKS.items()
        if int((np.abs(pixels - np.array(look.colour)).max(axis=1) <= tolerance).sum()) >= need
    ]
    return Detection(present, classify_setting(image))


def classify_setting(image: np.ndarray) -> str:
    h = image.shape[0]
    top = np.median(image[: max(h // 16, 1)].reshape(-1, 3), axis=0)
    bottom = np.median(image[h - max(h // 32, 1) :].reshape(-1, 3), axis=0)
    distances = [
        np.abs(top - np.array(s.sky)).sum() + np.abs(bottom - np.array(s.ground)).sum() for s in SETTINGS
    ]
    return SETTINGS[int(np.argmin(distances))].name
