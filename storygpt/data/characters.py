"""Per-dataset character tables: names, genders (for pronouns) and label order.

The label order is the order of the multi-hot vectors in ``labels.pkl`` / ``labels.npy``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

Gender = Literal["male", "female"]


@dataclass(frozen=True)
class Character:
    name: str  # display name, as it appears in captions
    gender: Gender
    aliases: tuple[str, ...] = ()  # other spellings in captions and annotations

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class CharacterTable:
    dataset: str
    characters: tuple[Character, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.characters]

    @cached_property
    def _by_spelling(self) -> dict[str, Character]:
        return {s.lower(): c for c in self.characters for s in c.spellings}

    def get(self, label: str) -> Character | None:
        """The character an annotation label or caption word names (case-insensitive)."""
        return self._by_spelling.get(label.strip().lower())

    def gender(self, name: str) -> Gender:
        char = self.get(name)
        if char is None:
            raise KeyError(f"{name!r} is not a {self.dataset} character ({', '.join(self.names)})")
        return char.gender

    def to_multi_hot(self, names: list[str]) -> list[int]:
        present = {self.get(n).name for n in names if self.get(n) is not None}
        return [int(c.name in present) for c in self.characters]

    def from_multi_hot(self, vector) -> list[str]:
        values = list(vector)
        if len(values) != len(self.characters):
            raise ValueError(
                f"{self.dataset} label vectors have {len(self.characters)} entries, got {len(values)}"
            )
        return [c.name for c, v in zip(self.characters, values) if float(v) > 0.5]

    @cached_property
    def mention_pattern(self) -> re.Pattern[str]:
        """Matches any spelling of any character as a whole word (longest spelling first)."""
        spellings = sorted(self._by_spelling, key=len, reverse=True)
        alternation = "|".join(re.escape(s) for s in spellings)
        return re.compile(rf"(?<![\w.])(?:{alternation})(?!\w)", re.IGNORECASE)


FLINTSTONES = CharacterTable(
    "flintstones",
    (
        Character("Wilma", "female"),
        Character("Fred", "male"),
        Character("Betty", "female"),
        Character("Barney", "male"),
        Character("Dino", "male"),
        Character("Pebbles", "female"),
        Character("Mr. Slate", "male", ("Mr Slate", "mr slate", "slate")),
    ),
)

PORORO = CharacterTable(
    "pororo",
    (
        Character("Pororo", "male"),
        Character("Loopy", "female"),
        Character("Crong", "male"),
        Character("Eddy", "male"),
        Character("Poby", "male"),
        Character("Petty", "female"),
        Character("Tongtong", "male"),
        Character("Rody", "male"),
        Character("Harry", "male"),
    ),
)

# The procedural story world's cast; what they look like lives in storygpt/world/cast.py.
WORLD = CharacterTable(
    "world",
    (
        Character("Ada", "female"),
        Character("Bruno", "male"),
        Character("Cleo", "female"),
        Character("Dario", "male"),
        Character("Emma", "female"),
        Character("Felix", "male"),
        Character("Gus", "male"),
    ),
)

TABLES = {t.dataset: t for t in (FLINTSTONES, PORORO, WORLD)}


def get_table(dataset: str) -> CharacterTable:
    try:
        return TABLES[dataset]
    except KeyError:
        raise KeyError(f"unknown dataset {dataset!r}; expected one of {sorted(TABLES)}") from None
