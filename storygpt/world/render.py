"""Draw one frame: a setting's background and characters as flat shapes, with exact masks.

Shapes are drawn without anti-aliasing, so every character pixel has exactly its colour
(or the eye colour) and the mask is exactly the set of pixels it covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from storygpt.world.cast import EYE_COLOUR, LOOKS, SETTINGS, Setting
from storygpt.world.stories import place_characters

Placement = tuple[int, int, int]  # centre x, centre y, size (px)


@dataclass
class RenderedFrame:
    image: np.ndarray  # (H, W, 3) uint8
    segments: np.ndarray  # (H, W) uint8: 0 background, k + 1 = character k
    boxes: list[tuple[int, int, int, int]]  # per character: x0, y0, x1, y1 (exclusive)


def draw_background(setting: Setting, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), setting.sky)
    draw = ImageDraw.Draw(img)
    horizon = int(setting.horizon * size)
    draw.rectangle([0, horizon, size, size], fill=setting.ground)
    c, step = setting.pattern_colour, max(size // 8, 4)
    if setting.pattern == "checker":
        for y in range(horizon, size, step):
            for x in range(((y - horizon) // step % 2) * step, size, 2 * step):
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=c)
    elif setting.pattern == "trunks":
        for x in range(step // 2, size, 2 * step):
            draw.rectangle([x, 0, x + step // 3, horizon], fill=c)
    elif setting.pattern in ("stars", "dots"):
        area = (0, horizon // 2) if setting.pattern == "stars" else (horizon, size - 2)
        for i in range(12):  # fixed layout: the pattern identifies the setting, not the story
            x = (i * 37 + 11) % size
            y = area[0] + (i * 53 + 7) % max(area[1] - area[0], 1)
            draw.rectangle([x, y, x + 1, y + 1], fill=c)
    elif setting.pattern == "window":
        draw.rectangle([size // 8, size // 10, size // 8 + size // 4, size // 10 + size // 5], fill=c)
    return img


def shape_mask(shape: str, cx: int, cy: int, s: int, size: int) -> np.ndarray:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    h = s // 2
    x0, y0, x1, y1 = cx - h, cy - h, cx + h, cy + h
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=1)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=1)
    elif shape == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=1)
    elif shape == "diamond":
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=1)
    elif shape == "hexagon":
        q = s // 4
        d.polygon([(x0 + q, y0), (x1 - q, y0), (x1, cy), (x1 - q, y1), (x0 + q, y1), (x0, cy)], fill=1)
    elif shape == "cross":
        t = max(s // 6, 2)
        d.rectangle([cx - t, y0, cx + t, y1], fill=1)
        d.rectangle([x0, cy - t, x1, cy + t], fill=1)
    elif shape == "ring":
        d.ellipse([x0, y0, x1, y1], fill=1)
        t = max(s // 4, 3)
        d.ellipse([x0 + t, y0 + t, x1 - t, y1 - t], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(mask, dtype=bool)


def render_frame(setting: Setting, cast: list[str], places: list[Placement], size: int) -> RenderedFrame:
    """Characters are placed in disjoint horizontal slots, so masks never overlap."""
    image = np.array(draw_background(setting, size))
    segments = np.zeros((size, size), dtype=np.uint8)
    boxes = []
    for k, (name, (cx, cy, s)) in enumerate(zip(cast, places)):
        mask = paint_character(image, name, cx, cy, s, free=segments == 0)
        segments[mask] = k + 1
        ys, xs = np.nonzero(mask)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return RenderedFrame(image, segments, boxes)


def paint_character(image: np.ndarray, name: str, cx: int, cy: int, s: int, free: np.ndarray) -> np.ndarray:
    """Paint a character's body and eyes into ``image`` where ``free``; returns its mask."""
    look = LOOKS[name]
    mask = shape_mask(look.shape, cx, cy, s, image.shape[0]) & free
    image[mask] = look.colour
    eye, ey = max(s // 10, 1), cy - s // 8
    for ex in (cx - s // 6, cx + s // 6 - eye + 1):
        eyes = np.zeros_like(mask)
        eyes[ey : ey + eye, ex : ex + eye] = True
        image[eyes & mask] = EYE_COLOUR
    return mask


def render_reference(name: str, size: int) -> np.ndarray:
    """A character alone, centred on a neutral grey: its reference image."""
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    paint_character(image, name, size // 2, size // 2, size * 5 // 8, free=np.ones((size, size), bool))
    return image


def random_frame(
    rng: np.random.Generator, size: int, include: str | None = None, max_characters: int = 3
) -> tuple[RenderedFrame, list[str]]:
    """A random setting with 0..``max_characters`` random characters (always ``include`` when
    given), placed as the world's stories place them, without planning a story: frames for
    pretraining the tiny zoo's VAE and testing it. Returns the frame and its cast, in drawing order."""
    setting = SETTINGS[int(rng.integers(len(SETTINGS)))]
    names = list(LOOKS)
    if include is None:
        cast = [str(n) for n in rng.choice(names, size=int(rng.integers(0, max_characters + 1)), replace=False)]
    else:
        others = [n for n in names if n != include]
        cast = [str(n) for n in rng.choice(others, size=int(rng.integers(0, max_characters)), replace=False)]
        cast.insert(int(rng.integers(len(cast) + 1)), include)
    places = place_characters(len(cast), size, setting.horizon, rng)
    return render_frame(setting, cast, places, size), cast
