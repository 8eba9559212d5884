"""Procedural episodes: who is in each frame, where, and the caption that says so.

Frames often keep the previous frame's characters, so the referential extension has pronouns
to make ("she", "they"); captions name every character present, using a coordinated subject
("Ada and Bruno") so "they" can replace it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storygpt.data.characters import WORLD
from storygpt.world.cast import SETTINGS, Setting

FRAMES_PER_STORY = 5
# (singular, plural) verb phrases
ACTIONS = (
    ("is standing", "are standing"),
    ("is walking", "are walking"),
    ("waves hello", "wave hello"),
    ("is laughing", "are laughing"),
    ("jumps up and down", "jump up and down"),
    ("is eating lunch", "are eating lunch"),
    ("is reading a book", "are reading books"),
    ("looks surprised", "look surprised"),
    ("is talking", "are talking"),
    ("sits down", "sit down"),
    ("runs around", "run around"),
    ("is singing a song", "are singing a song"),
)
TEMPLATES = ("{who} {act} {where}.", "{Where}, {who} {act}.", "{who} {act}.", "Later, {who} {act} {where}.")
PAIR_TEMPLATES = ("{a} talks to {b} {where}.", "{a} smiles at {b}.")  # not coordinated: no "they"
EMPTY_TEMPLATES = ("Nobody is {where}.", "The scene is empty {where}.")


@dataclass
class FramePlan:
    setting: Setting
    cast: list[str]
    caption: str


def join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def caption_for(cast: list[str], setting: Setting, rng: np.random.Generator) -> str:
    if not cast:
        return str(rng.choice(EMPTY_TEMPLATES)).format(where=setting.phrase)
    if len(cast) == 2 and rng.random() < 0.15:
        return str(rng.choice(PAIR_TEMPLATES)).format(a=cast[0], b=cast[1], where=setting.phrase)
    singular, plural = ACTIONS[rng.integers(len(ACTIONS))]
    template = str(rng.choice(TEMPLATES))
    text = template.format(
        who=join_names(cast),
        act=singular if len(cast) == 1 else plural,
        where=setting.phrase,
        Where=setting.phrase[0].upper() + setting.phrase[1:],
    )
    return text[0].upper() + text[1:]


# An episode is one continuous run of frames; the dataset's 5-frame stories are consecutive pieces
# of it, so a long story (10, 20, 40, 50 frames) is a run of consecutive frames, as on FlintstonesSV.
SAME_CAST = 0.7  # a frame keeps the previous frame's cast: the referential rule then makes a pronoun
NEW_SETTING = 0.2  # the story moves somewhere else
EMPTY_FRAME = 0.05


def plan_episode(rng: np.random.Generator, frames: int) -> list[FramePlan]:
    """``frames`` consecutive frames of one episode: a pool of 3-5 characters, each frame either
    the previous frame's cast again (:data:`SAME_CAST`) or a new choice of 1-3 of the pool."""
    names = WORLD.names
    pool = list(rng.choice(names, size=int(rng.integers(3, 6)), replace=False))
    setting = SETTINGS[rng.integers(len(SETTINGS))]
    plans: list[FramePlan] = []
    previous: list[str] = []
    for i in range(frames):
        if i > 0 and rng.random() < NEW_SETTING:
            setting = SETTINGS[rng.integers(len(SETTINGS))]
        if i > 0 and rng.random() < EMPTY_FRAME:
            cast: list[str] = []
        elif previous and rng.random() < SAME_CAST:
            cast = list(previous)
        else:
            cast = _subset(pool, rng, at_most=3)
        cast = sorted(cast, key=names.index)  # a stable order makes captions comparable
        plans.append(FramePlan(setting, cast, caption_for(cast, setting, rng)))
        previous = cast or previous
    return plans


def _subset(pool: list[str], rng: np.random.Generator, at_most: int = 4) -> list[str]:
    k = int(rng.integers(1, min(len(pool), at_most) + 1))
    return [str(n) for n in rng.choice(pool, size=k, replace=False)]


def place_characters(n: int, size: int, horizon: float, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Disjoint horizontal slots standing on the ground; returns (cx, cy, size) per character."""
    if n == 0:
        return []
    slot = size // n
    out = []
    for k in range(n):
        s = int(rng.integers(size * 7 // 32, min(size * 11 // 32, slot - 4) + 1))
        cx = k * slot + slot // 2 + int(rng.integers(-(slot - s) // 2 + 1, (slot - s) // 2))
        ground = int(horizon * size)
        cy = int(rng.integers(max(ground - s // 2, s // 2 + 1), size - s // 2 - 2))
        out.append((cx, cy, s))
    return out
