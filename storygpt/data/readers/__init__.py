"""Dataset readers: each yields :class:`~storygpt.data.records.Story` lists plus a report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, get_args

from storygpt.config import DatasetFormat
from storygpt.data.characters import CharacterTable
from storygpt.data.errors import DatasetError
from storygpt.data.records import ReadReport, Story
from storygpt.data.referential import referential_story
from storygpt.data.readers import flintstones, pororo, storygptv
from storygpt.data.readers.common import ReadOptions
from storygpt.data.runs import Position, consecutive_runs

__all__ = ["READERS", "ReadOptions", "frame_position", "method_variant", "read_long_stories", "read_stories"]

Reader = Callable[[Path, CharacterTable, ReadOptions], tuple[list[Story], ReadReport]]
# The one list of layouts: config.DatasetFormat and every --format choice name these keys.
READERS: dict[str, Reader] = {"flintstones": flintstones.read, "storygptv": storygptv.read, "pororo": pororo.read}
if set(READERS) != set(get_args(DatasetFormat)):  # a reader added here must be a config value too
    raise ImportError(f"storygpt.data.readers: READERS {sorted(READERS)} != config.DatasetFormat")
# Which layouts annotate character boxes. Without boxes there is nothing to crop, fuse or mask:
# the Char-LDM trains on text alone, L_reg never applies and stage 2 regresses plain-text targets.
HAS_BOXES = {"flintstones": True, "storygptv": True, "pororo": False}
if set(HAS_BOXES) != set(READERS):
    raise ImportError(f"storygpt.data.readers: HAS_BOXES {sorted(HAS_BOXES)} != READERS {sorted(READERS)}")


def method_variant(fmt: str) -> str:
    """Which form of the method a dataset layout can train, in words (logged with every run)."""
    if HAS_BOXES[fmt]:
        return "full: characters fused from their boxes' crops, L_reg on their masks"
    return ("text-only (the paper's 'Emb text' variant): no character boxes, so no fusion, no L_reg "
            "and plain-text stage-2 targets")



def read_stories(
    fmt: str, root: str | Path, table: CharacterTable, options: ReadOptions, referential: bool = True
) -> tuple[list[Story], ReadReport]:
    """Read ``root`` in layout ``fmt``; fill referential captions unless ``referential=False``."""
    if fmt not in READERS:
        raise ValueError(f"format: expected one of {sorted(READERS)}, got {fmt!r}")
    stories, report = READERS[fmt](Path(root), table, options)
    _check_table(root, stories, report, table)
    if referential:
        for story in stories:
            _fill_referential(story, table, options.referential_rule)
    report.stories, report.frames = len(stories), sum(len(s.frames) for s in stories)
    return stories, report


def frame_position(fmt: str) -> Position | None:
    """How a format's frame ids order the clips of an episode (None: only the stories tell)."""
    return flintstones.shot_position if fmt in ("flintstones", "storygptv") else None


def read_long_stories(
    fmt: str, root: str | Path, table: CharacterTable, options: ReadOptions, length: int, referential: bool = True
) -> tuple[list[Story], ReadReport]:
    """The split's long stories of ``length`` consecutive frames (:mod:`storygpt.data.runs`),
    referential captions computed over each whole run; ``options.limit`` caps the runs, not the
    stories read."""
    stories, report = read_stories(fmt, root, table, replace(options, limit=None), referential=False)
    runs = consecutive_runs([s.frames for s in stories], length, lambda f: f.id, frame_position(fmt), options.limit)
    long = []
    for run in runs:
        story_id = f"{run[0].id}+{length}"
        long.append(Story(story_id, [replace(f, story_id=story_id, index=k) for k, f in enumerate(run)]))
        if referential:
            _fill_referential(long[-1], table, options.referential_rule)
    report.stories, report.frames = len(long), sum(len(s.frames) for s in long)
    return long, report


def _fill_referential(story: Story, table: CharacterTable, rule: str) -> None:
    captions = referential_story([f.caption for f in story.frames], [f.characters for f in story.frames], table, rule)
    for frame, text in zip(story.frames, captions):
        frame.referential_caption = text


# Fewer unknown labels than this never fail the read: a handful of extras ("woman") is normal.
MIN_UNKNOWN_FOR_WRONG_TABLE = 5


def _check_table(root, stories: list[Story], report: ReadReport, table: CharacterTable) -> None:
    """Most annotation labels unknown means the wrong character table, not a dataset of extras:
    every name would be dropped and no pronoun written. Stop, naming the setting to change."""
    known = sum(len(f.characters) for s in stories for f in s.frames)
    unknown = sum(report.unknown_characters.values())
    if unknown >= MIN_UNKNOWN_FOR_WRONG_TABLE and unknown > known:
        common = sorted(report.unknown_characters, key=report.unknown_characters.get, reverse=True)[:5]
        raise DatasetError(str(root), None, f"{unknown} of {known + unknown} character labels are not "
                           f"{table.dataset} characters ({', '.join(common)}, ...): the wrong character table? "
                           f"Set the dataset's own with --dataset (data.dataset: world, flintstones or pororo)")
