"""PororoSV, as StoryGAN / StoryDALL-E read it.

``img_cache4.npy`` lists frame paths (bytes, relative to the root); ``following_cache4.npy``
the 4 paths after each; ``train_seen_unseen_ids.npy`` holds (train, val, test) index arrays into
them. A frame's id is its path without ``.png``; ``descriptions.npy`` and ``labels.npy`` are
dicts keyed by it. Each PNG is a vertical strip of square frames. No boxes, no settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from storygpt.data.characters import CharacterTable
from storygpt.data.errors import Problems
from storygpt.data.readers.common import ReadOptions, read_npy_object
from storygpt.data.records import Frame, ImageSource, ReadReport, Story

SPLITS = {"train": 0, "val": 1, "test": 2}


def _path(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read(root: Path, table: CharacterTable, opt: ReadOptions) -> tuple[list[Story], ReadReport]:
    report = ReadReport(table.dataset)
    problem = Problems(report, opt.on_error)
    images = read_npy_object(root / "img_cache4.npy")
    following = read_npy_object(root / "following_cache4.npy")
    split_file = root / "train_seen_unseen_ids.npy"
    split_arrays = read_npy_object(split_file)
    descriptions = read_npy_object(root / "descriptions.npy")
    labels = read_npy_object(root / "labels.npy")
    if len(split_arrays) != 3:
        problem(str(split_file), None, f"expected (train, val, test) index arrays, got {len(split_arrays)}")
        return [], report
    stories = []
    for item in sorted(int(i) for i in split_arrays[SPLITS[opt.split]]):
        if not 0 <= item < len(images) or item >= len(following):
            problem(str(split_file), str(item), f"index out of range for img_cache4.npy ({len(images)} entries)")
            continue
        paths = [_path(images[item]), *(_path(p) for p in following[item])][: opt.frames_per_story]
        story_id = paths[0].removesuffix(".png")
        frames = []
        for index, rel in enumerate(paths):
            frame = _frame(root, rel, story_id, index, descriptions, labels, table, opt, problem)
            if frame is None:
                break
            frames.append(frame)
        if len(frames) == opt.frames_per_story:
            stories.append(Story(story_id, frames))
        elif len(paths) < opt.frames_per_story:
            problem("following_cache4.npy", story_id, f"story has {len(paths)} frames, expected {opt.frames_per_story}")
        if opt.limit and len(stories) >= opt.limit:
            break
    return stories, report


def _frame(root, rel, story_id, index, descriptions, labels, table, opt, problem) -> Frame | None:
    fid = rel.removesuffix(".png")
    png = root / rel
    if fid not in descriptions:
        return problem("descriptions.npy", fid, f"frame of story {story_id} has no description")
    if fid not in labels:
        return problem("labels.npy", fid, f"frame of story {story_id} has no label vector")
    if opt.check_files and (why := _strip_problem(png, opt.clip_frame)) is not None:
        return problem(str(png), fid, why)
    try:
        names = table.from_multi_hot(np.asarray(labels[fid]).reshape(-1))
    except ValueError as err:
        return problem("labels.npy", fid, str(err))
    captions = [str(c) for c in np.atleast_1d(descriptions[fid])]
    caption = captions[0].strip()
    caption = caption[:1].upper() + caption[1:]  # PororoSV captions are often lower-cased
    return Frame(
        id=fid, story_id=story_id, index=index, caption=caption, characters=names,
        boxes=[None] * len(names), setting=None, captions=captions,
        image=ImageSource("png_strip", str(png), opt.clip_frame),
    )


def _strip_problem(png: Path, clip_frame: int) -> str | None:
    if not png.is_file():
        return "frame file is missing"
    try:
        with Image.open(png) as img:
            w, h = img.size
    except OSError as err:
        return f"unreadable PNG: {err}"
    if h % w or clip_frame >= h // w:
        return f"expected a vertical strip of square frames with > {clip_frame} frames, got {w}x{h}"
    return None
