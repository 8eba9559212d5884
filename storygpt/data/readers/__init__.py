"""Dataset readers: each yields :class:`~storygpt.data.records.Story` lists plus a report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storygpt.data.characters import CharacterTable
from storygpt.data.records import ReadReport, Story
from storygpt.data.referential import referential_story


@dataclass(frozen=True)
class ReadOptions:
    split: str = "train"
    frames_per_story: int = 5
    clip_frame: int = 0
    box_source_size: tuple[int, int] | None = None
    on_error: str = "raise"
    limit: int | None = None  # stop after this many stories
    # False: leave image files unchecked here; preprocessing checks each frame where it loads it,
    # so one bad frame becomes one error row instead of costing its whole story.
    check_files: bool = True


def read_stories(
    fmt: str, root: str | Path, table: CharacterTable, options: ReadOptions, referential: bool = True
) -> tuple[list[Story], ReadReport]:
    """Read ``root`` in layout ``fmt``; fill referential captions unless ``referential=False``."""
    from storygpt.data.readers import flintstones, pororo, storygptv

    readers = {"flintstones": flintstones.read, "storygptv": storygptv.read, "pororo": pororo.read}
    if fmt not in readers:
        raise ValueError(f"format: expected one of {sorted(readers)}, got {fmt!r}")
    stories, report = readers[fmt](Path(root), table, options)
    if referential:
        for story in stories:
            captions = referential_story(
                [f.caption for f in story.frames], [f.characters for f in story.frames], table
            )
            for frame, text in zip(story.frames, captions):
                frame.referential_caption = text
    report.stories, report.frames = len(stories), sum(len(s.frames) for s in stories)
    return stories, report
