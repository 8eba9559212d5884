"""Which stories the evaluation draws: the split's stories (whole, or their first N frames)
and long stories chained from consecutive ones (the paper's 10/20/40/50-frame runs)."""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

# what a story frame carries through generation and scoring (the image is read where needed)
FRAME_FIELDS = ["id", "story_id", "frame_index", "caption", "referential_caption", "characters", "setting"]


def split_stories(records: pa.Table, split: str, frames: int | None = None, limit: int | None = None) -> list[list[dict]]:
    """The split's stories in story-id order, each its frames in order; ``frames`` keeps the first
    N of each story (stories shorter than N are left out), ``limit`` the first stories."""
    rows = records.filter(pc.equal(records["split"], split)).select(FRAME_FIELDS).to_pylist()
    by_story: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_story[row["story_id"]].append(row)
    stories = []
    for story_id in sorted(by_story):
        story = sorted(by_story[story_id], key=lambda r: r["frame_index"])
        if frames is None or len(story) >= frames:
            stories.append(story[:frames] if frames else story)
    return stories[:limit] if limit else stories


def long_stories(stories: list[list[dict]], length: int, count: int) -> list[list[dict]]:
    """Up to ``count`` stories of exactly ``length`` frames, each consecutive stories chained
    (an episode read on): the split has to hold ``length * count`` frames for all of them."""
    frames = [frame for story in stories for frame in story]
    chained = []
    for k in range(min(count, len(frames) // length)):
        chunk = frames[k * length:(k + 1) * length]
        chained.append([{**f, "story_id": f"long{length}-{k}", "frame_index": i} for i, f in enumerate(chunk)])
    return chained
