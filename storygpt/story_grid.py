"""A story as one picture a person can look at: the frames side by side, upscaled to a visible size
with nearest-neighbour (a 32 px tiny-preset frame stays crisp at 192 px), each caption wrapped
under its frame."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FRAME_PX = 192  # the smallest frames are upscaled by a whole factor to at least this
PAD = 8
FONT_PX = 13


def story_grid(frames: list[np.ndarray], captions: list[str], frame_px: int = FRAME_PX) -> Image.Image:
    """``frames`` (H, W, 3) uint8 in story order and their ``captions`` -> one RGB image."""
    if len(frames) != len(captions) or not frames:
        raise ValueError(f"story_grid: {len(frames)} frames but {len(captions)} captions")
    height, width = frames[0].shape[:2]
    scale = max(1, -(-frame_px // max(height, width)))  # a whole factor: pixels stay square
    side_w, side_h = width * scale, height * scale
    font = ImageFont.load_default(size=FONT_PX)
    char_px = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    lines = [textwrap.wrap(c, width=max(8, int(side_w / char_px))) or [""] for c in captions]
    line_px = FONT_PX + 4
    text_h = max(len(ls) for ls in lines) * line_px + PAD
    grid = Image.new("RGB", (len(frames) * (side_w + PAD) + PAD, PAD + side_h + PAD + text_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (frame, wrapped) in enumerate(zip(frames, lines)):
        x = PAD + i * (side_w + PAD)
        grid.paste(Image.fromarray(frame).resize((side_w, side_h), Image.NEAREST), (x, PAD))
        for j, line in enumerate(wrapped):
            draw.text((x, PAD + side_h + PAD + j * line_px), line, fill="black", font=font)
    return grid
