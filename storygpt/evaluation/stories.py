"""Which stories the evaluation draws: the split's stories (whole, or their first N frames)
and long stories, runs of consecutive frames (the paper's 10/20/40/50-frame runs, Table 5)."""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from storygpt.data.characters import CharacterTable
from storygpt.data.referential import referential_story
from storygpt.data.runs import Position, consecutive_runs

# what a story frame carries through generation and scoring (the image is read where needed)
FRAME_FIELDS = ["id", "story_id", "frame_index", "caption", "referential_caption", "characters", "setting"]


def split_stories(records: pa.Table, split: str, frames: int | None = None, limit: int | None = None) -> list[list[dict]]:
    """The split's stories in story-id order, each its frames in order; ``frames`` keeps the first
    N of each story (stories shorter than N are left out), ``limit`` that many spread evenly over
    the split: consecutive stories are pieces of one episode, with its cast and settings."""
    rows = records.filter(pc.equal(records["split"], split)).select(FRAME_FIELDS).to_pylist()
    stories = [story[:frames] if frames else story for story in group_stories(rows)
               if frames is None or len(story) >= frames]
    if not limit or limit >= len(stories):
        return stories
    return [stories[k * len(stories) // limit] for k in range(limit)]


def group_stories(rows: list[dict]) -> list[list[dict]]:
    """Rows with ``story_id`` and ``frame_index`` → stories in story-id order, frames in order."""
    by_story: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_story[row["story_id"]].append(row)
    return [sorted(by_story[story_id], key=lambda r: r["frame_index"]) for story_id in sorted(by_story)]


def long_stories(stories: list[list[dict]], length: int, count: int, position: Position | None,
                 table: CharacterTable, rule: str) -> list[list[dict]]:
    """Up to ``count`` long stories of exactly ``length`` consecutive frames, each frame once
    (:func:`storygpt.data.runs.consecutive_runs`; ``position``: the dataset's shot order, see
    :func:`storygpt.data.readers.frame_position`), their referential captions recomputed over
    the whole run: the first frame names its cast, as a story's first frame does."""
    out = []
    for k, run in enumerate(consecutive_runs(stories, length, lambda f: f["id"], position, count)):
        captions = referential_story([f["caption"] for f in run], [f["characters"] for f in run], table, rule)
        out.append([{**f, "story_id": f"long{length}-{k}", "frame_index": i, "referential_caption": caption}
                    for i, (f, caption) in enumerate(zip(run, captions))])
    return out
