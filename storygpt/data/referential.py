"""The referential extension (paper Algorithm 1, Make-A-Story's rules).

The first frame sets the tracked character set. A later frame whose characters match the
tracked set is rewritten: one character -> "he"/"she" by gender (object and possessive forms
where the grammar asks), several -> "they" replacing the coordinated names ("A and B",
"A, B and C"); the tracked set stays. Any other frame resets the tracked set to its own
characters. What "match" means is the rule (``data.referential_rule``):

* ``equal``: the frame shows exactly the tracked set. Make-A-Story's and the official
  StoryGPT-V loaders test ``chars == tracked or chars in tracked``; the second clause compares
  a list with a list of strings and is never true, so in effect they test equality, and the
  paper's referential numbers were measured on that. Every pronoun then has one referent.
* ``subset``: the frame's set is a subset of the tracked set, Algorithm 1 as the paper writes
  it. It makes more pronoun frames, some of them ambiguous: tracked {Fred, Barney}, then
  {Barney} gives "He walks away.".

Unlike the reference loaders (which compare a list with a list, so every character becomes
"He"), the pronoun follows each character's gender from the dataset's table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from storygpt.data.characters import CharacterTable

ReferentialRule = Literal["equal", "subset"]
RULES: tuple[ReferentialRule, ...] = ("equal", "subset")

PRONOUNS = {
    "male": {"subject": "he", "object": "him", "possessive": "his"},
    "female": {"subject": "she", "object": "her", "possessive": "her"},
    "plural": {"subject": "they", "object": "them", "possessive": "their"},
}
# A mention right after one of these words (or at a clause start) is a grammatical subject.
_SUBJECT_CONTEXT = re.compile(r"(^|[.!?;:,]\s*|\b(?:and|but|then|while|when|as|so|because)\s+)$", re.I)
_SEPARATOR = re.compile(r"^\s*(?:,\s*and|,|and)\s*$", re.I)


@dataclass(frozen=True)
class Mention:
    name: str  # the table's display name
    start: int
    end: int  # exclusive; includes a possessive "'s" when present
    possessive: bool


def find_mentions(caption: str, table: CharacterTable) -> list[Mention]:
    """Every whole-word mention of a table character in ``caption``, left to right."""
    out = []
    for m in table.mention_pattern.finditer(caption):
        end, possessive = m.end(), False
        if caption[end : end + 2] in ("'s", "’s"):
            end, possessive = end + 2, True
        out.append(Mention(table.get(m.group(0)).name, m.start(), end, possessive))
    return out


def referential_story(
    captions: list[str], characters: list[list[str]], table: CharacterTable, rule: ReferentialRule = "equal"
) -> list[str]:
    """Referential captions for one story (or any run of consecutive frames); frame i keeps its
    caption when the rule does not apply or the caption cannot be rewritten."""
    if len(captions) != len(characters):
        raise ValueError(f"{len(captions)} captions but {len(characters)} character lists")
    if rule not in RULES:
        raise ValueError(f"referential rule: expected one of {list(RULES)}, got {rule!r}")
    out: list[str] = []
    tracked: set[str] = set()
    for i, (caption, names) in enumerate(zip(captions, characters)):
        current = {table.get(n).name for n in names if table.get(n) is not None}
        # (an empty frame is a subset of anything, so under `subset` it keeps the chain)
        if i > 0 and (current <= tracked if rule == "subset" else current == tracked):
            out.append(rewrite_caption(caption, current, table))
            continue  # the tracked set stays as it was
        tracked = current
        out.append(caption)
    return out


def rewrite_caption(caption: str, characters: set[str], table: CharacterTable) -> str:
    """Replace the mentions of ``characters`` with the right pronoun; unchanged if impossible."""
    mentions = [m for m in find_mentions(caption, table) if m.name in characters]
    if not mentions:
        return caption
    if len(characters) == 1:
        gender = table.gender(next(iter(characters)))
        return _substitute(caption, [[m] for m in mentions], PRONOUNS[gender])
    groups = _coordinated_groups(caption, mentions, characters)
    return _substitute(caption, groups, PRONOUNS["plural"]) if groups else caption


def _coordinated_groups(caption: str, mentions: list[Mention], wanted: set[str]) -> list[list[Mention]]:
    """Runs of mentions joined by ',', 'and' or ', and' that name exactly ``wanted``."""
    groups, run = [], [mentions[0]]
    for prev, cur in zip(mentions, mentions[1:]):
        if not prev.possessive and _SEPARATOR.match(caption[prev.end : cur.start]):
            run.append(cur)
        else:
            groups.append(run)
            run = [cur]
    groups.append(run)
    return [g for g in groups if {m.name for m in g} == wanted and len(g) == len(wanted)]


def _substitute(caption: str, groups: list[list[Mention]], forms: dict[str, str]) -> str:
    pieces, cursor = [], 0
    for group in groups:
        start, end, last = group[0].start, group[-1].end, group[-1]
        before = caption[:start]
        if last.possessive:
            word = forms["possessive"]
        elif _SUBJECT_CONTEXT.search(before):
            word = forms["subject"]
        else:
            word = forms["object"]
        if not before.strip() or re.search(r"[.!?]\s*$", before):
            word = word[0].upper() + word[1:]
        pieces += [caption[cursor:start], word]
        cursor = end
    pieces.append(caption[cursor:])
    return "".join(pieces)
