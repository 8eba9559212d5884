"""FlintstonesSV, raw release layout, as StoryDALL-E / AR-LDM read it.

Stories are the keys of ``following_cache{N-1}.pkl`` that are in the split, followed by their
cached ids. Character boxes come from the annotation (``rectangles``: one box per sampled frame,
or a single ``rectangle``/``box``), in frame pixels unless ``box_source_size`` says otherwise.
A ``masks/{id}.npy`` beside the frames (the story world writes them) gives exact segment maps.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from storygpt.data.characters import CharacterTable
from storygpt.data.errors import Problems
from storygpt.data.images import npy_clip_shape
from storygpt.data.readers.common import (
    BoxFrameCheck, ReadOptions, clip_problem, frame_size, read_json, read_pickle, resolve_character, scale_box,
    split_ids,
)
from storygpt.data.records import Frame, ImageSource, MaskSource, ReadReport, Story

ANNOTATIONS = "flintstones_annotations_v1-0.json"
SPLIT = "train-val-test_split.json"
_SHOT = re.compile(r"^(s_\d+_e_\d+)_shot_(\d+)_\d+$")


def shot_position(frame_id: str) -> tuple[str, int] | None:
    """(episode, first frame of the shot) of a FlintstonesSV id such as 's_01_e_26_shot_000055_000129':
    the release's following caches were built by sorting ids within an episode, so this is the
    order of the clips in it. None for an id of another form."""
    match = _SHOT.match(frame_id)
    return (match.group(1), int(match.group(2))) if match else None


def read(root: Path, table: CharacterTable, opt: ReadOptions) -> tuple[list[Story], ReadReport]:
    return _Reader(root, table, opt).read()


class _Reader:
    def __init__(self, root: Path, table: CharacterTable, opt: ReadOptions):
        self.root, self.table, self.opt = root, table, opt
        self.report = ReadReport(table.dataset)
        self.problem = Problems(self.report, opt.on_error)
        self.annotations = {a["globalID"]: a for a in read_json(root / ANNOTATIONS)}
        self.in_split = set(split_ids(root / SPLIT, opt.split))
        self.following_file = root / f"following_cache{opt.frames_per_story - 1}.pkl"
        self.following = read_pickle(self.following_file)
        self.boxes = BoxFrameCheck(opt.box_source_size)

    def read(self) -> tuple[list[Story], ReadReport]:
        stories, n = [], self.opt.frames_per_story
        for key in sorted(k for k in self.following if k in self.in_split):
            ids = [key, *self.following[key]][:n]
            if len(ids) < n:
                self.problem(str(self.following_file), key, f"story has {len(ids)} frames, expected {n}")
                continue
            frames = []
            for index, fid in enumerate(ids):
                frame = self.frame(fid, key, index)
                if frame is None:
                    break  # the problem is recorded; a story with a hole is no story
                frames.append(frame)
            if len(frames) == n:
                stories.append(Story(key, frames))
            if self.opt.limit and len(stories) >= self.opt.limit:
                break
        self.boxes.verdict(str(self.root / ANNOTATIONS))
        return stories, self.report

    def frame(self, fid: str, story_id: str, index: int) -> Frame | None:
        ann = self.annotations.get(fid)
        if ann is None:
            return self.problem(ANNOTATIONS, fid, f"frame of story {story_id} has no annotation")
        if fid not in self.in_split:
            return self.problem(SPLIT, fid, f"frame of story {story_id} is not in the '{self.opt.split}' split")
        npy = self.root / "video_frames_sampled" / f"{fid}.npy"
        if self.opt.check_files and (why := clip_problem(npy, self.opt.clip_frame)) is not None:
            return self.problem(str(npy), fid, why)
        size = frame_size(npy)
        names, boxes, segment_ids, unknown = [], [], [], []
        for k, char in enumerate(ann.get("characters") or []):
            name = resolve_character(str(char.get("entityLabel", "")), self.table, self.report, unknown)
            if name is None:
                continue
            raw = _box(char, self.opt.clip_frame)
            if raw is not None and (len(raw) != 4 or not all(isinstance(v, (int, float)) for v in raw)):
                return self.problem(ANNOTATIONS, fid, f"character {name}: expected [x0, y0, x1, y1], got {raw!r}")
            box = scale_box(raw, self.opt.box_source_size, size) if raw is not None else None
            if box is not None:
                self.boxes.see(box, size, fid)  # one stray box is validation's (it drops the box)
            names.append(name)
            boxes.append(box)
            segment_ids.append(k + 1)
        masks = None
        mask_file = self.root / "masks" / f"{fid}.npy"
        if mask_file.is_file() and self.opt.check_files:
            shape = npy_clip_shape(mask_file)
            if len(shape) != 3 or self.opt.clip_frame >= shape[0] or shape[1:] != (size, size):
                return self.problem(str(mask_file), fid, f"expected (T, {size}, {size}) segment maps, got {shape}")
        if mask_file.is_file():
            masks = MaskSource("segment_map_clip", str(mask_file), self.opt.clip_frame, tuple(segment_ids))
        caption = str(ann.get("description", "")).strip()
        return Frame(
            id=fid, story_id=story_id, index=index, caption=caption, characters=names, boxes=boxes,
            setting=ann.get("setting"), captions=[caption], masks=masks, unknown_characters=unknown,
            image=ImageSource("npy_clip", str(npy), self.opt.clip_frame),
        )


def _box(char: dict, clip_frame: int) -> list | None:
    rects = char.get("rectangles")
    if rects:
        if isinstance(rects[0], (list, tuple)):  # one box per sampled frame
            return list(rects[min(clip_frame, len(rects) - 1)])
        return list(rects)
    for key in ("rectangle", "box", "bbox"):
        if char.get(key) is not None:
            return np.asarray(char[key], dtype=float).reshape(-1).tolist()
    return None
