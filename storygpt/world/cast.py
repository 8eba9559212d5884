"""What the world's characters and settings look like.

Colours are chosen so an exact colour/shape detector can tell every character and setting
apart (``storygpt/world/detector.py``): character colours are saturated and at least
``MIN_COLOUR_GAP`` (L-infinity) from one another and from every background colour.
Names and genders live in the character table (``storygpt/data/characters.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

RGB = tuple[int, int, int]
MIN_COLOUR_GAP = 60


@dataclass(frozen=True)
class Look:
    colour: RGB
    shape: str  # circle, square, triangle, diamond, hexagon, cross, ring


@dataclass(frozen=True)
class Setting:
    name: str
    phrase: str  # how captions place a character there
    sky: RGB  # upper part (wall or sky)
    ground: RGB  # lower part (floor or ground)
    horizon: float  # fraction of the height where the ground starts
    pattern: str | None = None  # checker, trunks, stars, window, dots
    pattern_colour: RGB | None = None


LOOKS: dict[str, Look] = {
    "Ada": Look((230, 30, 30), "circle"),
    "Bruno": Look((30, 60, 240), "square"),
    "Cleo": Look((250, 220, 0), "triangle"),
    "Dario": Look((0, 180, 40), "diamond"),
    "Emma": Look((220, 0, 220), "hexagon"),
    "Felix": Look((255, 120, 0), "cross"),
    "Gus": Look((0, 230, 230), "ring"),
}

EYE_COLOUR: RGB = (20, 20, 20)

SETTINGS: tuple[Setting, ...] = (
    Setting("beach", "on the beach", (150, 190, 225), (225, 205, 160), 0.55),
    Setting("forest", "in the forest", (110, 140, 110), (70, 95, 60), 0.6, "trunks", (100, 75, 50)),
    Setting("kitchen", "in the kitchen", (235, 230, 205), (150, 150, 150), 0.62, "checker", (95, 95, 95)),
    Setting("living room", "in the living room", (195, 165, 135), (130, 95, 70), 0.62, "window", (175, 205, 230)),
    Setting("street", "on the street at night", (35, 35, 75), (80, 80, 90), 0.6, "stars", (205, 205, 160)),
    Setting("desert", "in the desert", (240, 195, 145), (200, 150, 95), 0.5),
    Setting("snowfield", "in a snowy field", (185, 195, 215), (245, 245, 250), 0.55),
    Setting("cave", "in a cave", (75, 65, 55), (115, 100, 85), 0.58, "dots", (140, 125, 105)),
    Setting("garden", "in the garden", (160, 205, 235), (120, 160, 95), 0.58, "dots", (235, 170, 190)),
    Setting("office", "in the office", (205, 210, 215), (145, 150, 160), 0.62, "window", (160, 195, 225)),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
