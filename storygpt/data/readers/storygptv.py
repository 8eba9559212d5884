"""The StoryGPT-V preprocessed layout (what the official stage-1 loader reads).

``split.json``, ``following_cache3.pkl`` (4-frame stories), ``cleaned_annotations.json``
(id -> ``caption``/``captions``, ``tokens``, ``segments``), ``video_frames_sampled_4x/{id}.npy``
(512 px clips) and ``seg_mask_4x_comb/{id}-frame{k}.npy`` (segment-id maps; absent = no masks).

Segment boxes are named ``[h1, w1, h2, w2]`` at 128 px, but the official loader crops
``image[:, w1:w2, h1:h2]`` (rows by ``w``, columns by ``h``): they behave as ``[x0, y0, x1, y1]``,
and that is how they are read here, scaled to the stored frame size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from storygpt.data.characters import CharacterTable
from storygpt.data.errors import Problems
from storygpt.data.images import npy_clip_shape
from storygpt.data.readers.common import (
    ReadOptions, clip_problem, read_json, read_pickle, resolve_character, scale_box, split_ids,
)
from storygpt.data.records import Frame, ImageSource, MaskSource, ReadReport, Story

ANNOTATIONS = "cleaned_annotations.json"
BOX_GRID = 128  # the segments' boxes are expressed at 128 px


def read(root: Path, table: CharacterTable, opt: ReadOptions) -> tuple[list[Story], ReadReport]:
    report = ReadReport(table.dataset)
    problem = Problems(report, opt.on_error)
    annotations = read_json(root / ANNOTATIONS)
    in_split = set(split_ids(root / "split.json", opt.split))
    following_file = root / f"following_cache{opt.frames_per_story - 1}.pkl"
    following = read_pickle(following_file)
    backgrounds = read_pickle(root / "labels_bg.pkl") if (root / "labels_bg.pkl").is_file() else {}
    stories = []
    for key in sorted(k for k in following if k in in_split):
        ids = [key, *following[key]][: opt.frames_per_story]
        frames = []
        for index, fid in enumerate(ids):
            info = annotations.get(fid)
            if info is None:
                problem(ANNOTATIONS, fid, f"frame of story {key} has no annotation")
                break
            npy = root / "video_frames_sampled_4x" / f"{fid}.npy"
            if opt.check_files and (why := clip_problem(npy, opt.clip_frame)) is not None:
                problem(str(npy), fid, why)
                break
            frames.append(_frame(root, fid, key, index, info, npy, backgrounds.get(fid), table, opt, report))
        if len(frames) == opt.frames_per_story:
            stories.append(Story(key, frames))
        elif len(ids) < opt.frames_per_story:
            problem(str(following_file), key, f"story has {len(ids)} frames, expected {opt.frames_per_story}")
        if opt.limit and len(stories) >= opt.limit:
            break
    return stories, report


def _frame(root, fid, story_id, index, info, npy, background, table, opt, report) -> Frame:
    try:
        shape = npy_clip_shape(npy)
    except (ValueError, OSError):
        shape = (1,)  # unreadable: the load stage reports it
    size = shape[-2] if len(shape) > 1 else None
    captions = [info["caption"]] if "caption" in info else list(info.get("captions") or [""])
    names, boxes, segment_ids, unknown = [], [], [], []
    for seg in sorted(info.get("segments") or [], key=lambda s: s.get("end", 0)):
        name = resolve_character(str(seg.get("word", "")), table, report, unknown)
        if name is None:
            continue
        names.append(name)
        bbox = seg.get("bbox")
        boxes.append(scale_box(bbox, (BOX_GRID, BOX_GRID), size) if bbox is not None else None)
        segment_ids.append(int(seg["id"]) if "id" in seg else None)
    n_clip = shape[0] if len(shape) == 4 else 1
    mask_file = root / "seg_mask_4x_comb" / f"{fid}-frame{opt.clip_frame}.npy"
    masks = MaskSource("segment_map", str(mask_file), opt.clip_frame, tuple(segment_ids)) if mask_file.is_file() else None
    return Frame(
        id=fid, story_id=story_id, index=index, caption=_caption_for_clip_frame(captions, opt.clip_frame, n_clip),
        characters=names, boxes=boxes, setting=_setting(background), captions=captions, masks=masks,
        unknown_characters=unknown,
        image=ImageSource("npy_clip", str(npy), opt.clip_frame),
    )


def _caption_for_clip_frame(captions: list[str], clip_frame: int, n_clip: int) -> str:
    """The official loader's choice of caption for sampled frame k when there are several."""
    if len(captions) == 1:
        return captions[0]
    idx = int(np.ceil((clip_frame + 1) / n_clip * len(captions)))
    return captions[min(idx, len(captions) - 1)]


def _setting(background) -> str | None:
    """``labels_bg.pkl`` holds a one-hot over the dataset's settings; names are not shipped."""
    if background is None:
        return None
    values = np.asarray(background).reshape(-1)
    return f"bg{int(values.argmax())}" if values.size and values.max() > 0 else None
