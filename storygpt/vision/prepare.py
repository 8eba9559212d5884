"""Turn dataset frames into training records, one step at a time (preprocessing calls these).

A frame travels between steps as a plain row ``{"id", "meta", "image", "masks"}`` — metadata
as JSON, pixels as raw bytes — so any executor (a loop here, Ray Data actors at scale) can pass
it along. Each step appends :class:`~storygpt.data.validate.Problem` s to ``meta["problems"]``
instead of raising; a frame with a frame-level problem is carried to the end and reported.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from storygpt.data.characters import CharacterTable
from storygpt.data.errors import DatasetError
from storygpt.data.images import load_image, load_masks
from storygpt.data.record_schema import ERRORS, RECORDS, encode_png
from storygpt.data.records import Frame, ImageSource, MaskSource
from storygpt.data.tokens import name_token_spans
from storygpt.data.validate import Problem, check_box, scale_boxes
from storygpt.vision.masks import BoxMasker
from storygpt.vision.super_resolution import SuperResolver


def frame_row(frame: Frame, split: str) -> dict:
    meta = {**frame.to_dict(), "split": split, "problems": [], "size": 0, "mask_encoder_runs": 0}
    return {"id": frame.id, "meta": json.dumps(meta), "image": b"", "masks": b""}


def _meta(row: dict) -> dict:
    return json.loads(row["meta"])


def _dropped(meta: dict) -> bool:
    return any(p["dropped"] == "frame" for p in meta["problems"])


def _problem(meta: dict, stage: str, reason: str, dropped: str) -> None:
    meta["problems"].append(asdict(Problem(stage, reason, dropped)))


def guarded(stage: str):
    """An unexpected failure on one frame drops that frame with the error, not the whole run."""

    def wrap(step):
        @functools.wraps(step)
        def run(row: dict, *args):
            try:
                return step(row, *args)
            except Exception as err:  # noqa: BLE001 - reported per frame, see docstring
                meta = _meta(row)
                _problem(meta, stage, f"{type(err).__name__}: {err}", "frame")
                return {**row, "meta": json.dumps(meta), "image": b"", "masks": b""}

        return run

    return wrap


@guarded("load")
def load_and_validate(row: dict, table: CharacterTable, tokenizer, dataset_masks: bool = True) -> dict:
    """Load the pixels; check caption, characters and boxes; find the names' token spans.
    ``dataset_masks=False`` ignores masks the dataset ships (they are then made from boxes)."""
    meta = _meta(row)
    if not dataset_masks:
        meta["masks"] = None
    for label in meta.get("unknown_characters", []):
        _problem(meta, "validate", f"character {label!r} is not in the {table.dataset} table", "character")
    if not meta["caption"].strip():
        _problem(meta, "validate", "empty caption", "frame")
    try:
        image = load_image(ImageSource(**meta["image"]))
    except DatasetError as err:
        _problem(meta, "load", err.reason, "frame")
        return {**row, "meta": json.dumps(meta)}
    size = image.shape[0]
    boxes = []
    for name, box in zip(meta["characters"], meta["boxes"]):
        clipped, why = (None, None) if box is None else check_box(tuple(box), size, size)
        if why:
            _problem(meta, "validate", f"{name}: {why}", "box")
        boxes.append(clipped)
    meta.update(size=size, boxes=boxes)
    meta["token_spans"] = name_token_spans(tokenizer, meta["caption"], meta["characters"], table)
    masks = b""
    if meta["masks"] is not None:
        try:
            masks = np.packbits(load_masks(MaskSource(**meta["masks"]))).tobytes()
        except DatasetError as err:
            _problem(meta, "load", f"masks: {err.reason}", "box")
            meta["masks"] = None
    return {**row, "meta": json.dumps(meta), "image": image.tobytes(), "masks": masks}


def _image(row: dict, meta: dict) -> np.ndarray:
    return np.frombuffer(row["image"], np.uint8).reshape(meta["size"], meta["size"], 3)


def _given_masks(row: dict, meta: dict) -> np.ndarray:
    k, s = len(meta["characters"]), meta["size"]
    return np.unpackbits(np.frombuffer(row["masks"], np.uint8), count=k * s * s).reshape(k, s, s).astype(bool)


def super_resolve(rows: list[dict], resolver: SuperResolver) -> list[dict]:
    """Upscale every loaded frame; boxes and dataset masks follow to the new size."""
    live = [(i, _meta(r)) for i, r in enumerate(rows) if r["image"]]
    out = list(rows)
    if not live:
        return out
    try:
        images = resolver([_image(rows[i], m) for i, m in live])
    except Exception as err:  # noqa: BLE001 - drop only the frame(s) that fail
        if len(live) > 1:  # retry one by one to find them
            return [done for row in rows for done in super_resolve([row], resolver)]
        i, meta = live[0]
        _problem(meta, "super_resolution", f"{type(err).__name__}: {err}", "frame")
        out[i] = {**rows[i], "meta": json.dumps(meta), "image": b"", "masks": b""}
        return out
    for (i, meta), image in zip(live, images):
        new = image.shape[0]
        if rows[i]["masks"]:  # dataset masks: nearest-neighbour to the new size
            given = _given_masks(rows[i], meta)
            idx = (np.arange(new) * meta["size"]) // new
            rows_masks = np.packbits(given[:, idx][:, :, idx]).tobytes()
        else:
            rows_masks = b""
        meta["boxes"] = scale_boxes(meta["boxes"], meta["size"], new)
        meta["size"] = new
        out[i] = {**rows[i], "meta": json.dumps(meta), "image": image.tobytes(), "masks": rows_masks}
    return out


@guarded("masks")
def add_masks(row: dict, masker: BoxMasker) -> dict:
    """Masks from boxes for frames the dataset gave none; frames without boxes get none."""
    meta = _meta(row)
    if not row["image"] or row["masks"] or not any(b is not None for b in meta["boxes"]):
        return row
    image = _image(row, meta)
    with_box = [k for k, b in enumerate(meta["boxes"]) if b is not None]
    before = masker.encoder_runs
    predicted = masker(image, [tuple(meta["boxes"][k]) for k in with_box])
    meta["mask_encoder_runs"] = masker.encoder_runs - before
    masks = np.zeros((len(meta["characters"]), meta["size"], meta["size"]), dtype=bool)
    masks[with_box] = predicted
    meta["mask_from_boxes"] = with_box
    return {**row, "meta": json.dumps(meta), "masks": np.packbits(masks).tobytes()}


def to_tables(rows: list[dict]) -> tuple[pa.Table, pa.Table, dict]:
    """(records, errors, stats) for a batch of finished rows."""
    records, errors = [], []
    stats = {"frames": len(rows), "records": 0, "dropped": 0, "mask_encoder_runs": 0, "boxes_masked": 0}
    for row in rows:
        meta = _meta(row)
        errors += [{"id": row["id"], "story_id": meta["story_id"], **p} for p in meta["problems"]]
        if _dropped(meta) or not row["image"]:
            stats["dropped"] += 1
            continue
        masks = _given_masks(row, meta) if row["masks"] else None
        has_mask = set(meta.get("mask_from_boxes", range(len(meta["characters"])))) if masks is not None else set()
        records.append({
            "id": row["id"], "story_id": meta["story_id"], "frame_index": meta["index"], "split": meta["split"],
            "caption": meta["caption"], "referential_caption": meta["referential_caption"],
            "characters": meta["characters"], "boxes": meta["boxes"], "token_spans": meta["token_spans"],
            "masks": [encode_png(masks[k]) if k in has_mask else None for k in range(len(meta["characters"]))],
            "setting": meta["setting"], "image": encode_png(_image(row, meta)), "size": meta["size"],
            "source": meta["image"]["path"],
        })
        stats["mask_encoder_runs"] += meta["mask_encoder_runs"]
        stats["boxes_masked"] += len(meta.get("mask_from_boxes", []))
    stats["records"] = len(records)
    return pa.Table.from_pylist(records, RECORDS), pa.Table.from_pylist(errors, ERRORS), stats


def records_in_process(cfg, split: str = "train") -> list[dict]:
    """One split's record rows through these same steps in a plain loop, without Ray (tests,
    benchmarks). Backends and sizes come from ``cfg`` as in the Ray pipeline."""
    from storygpt.data.characters import get_table
    from storygpt.data.readers import ReadOptions, read_stories
    from storygpt.models.loading import load_clip_tokenizer

    table = get_table(cfg.data.dataset)
    options = ReadOptions(split, cfg.data.frames_per_story, cfg.data.clip_frame, cfg.data.box_source_size,
                          referential_rule=cfg.data.referential_rule)
    stories, _ = read_stories(cfg.data.format, cfg.path(cfg.data.root), table, options)
    tokenizer = load_clip_tokenizer(cfg.path(cfg.models.clip_text))
    pre = cfg.preprocess
    rows = [load_and_validate(frame_row(f, split), table, tokenizer, pre.masks.prefer_dataset_masks)
            for s in stories for f in s.frames]
    resolver = SuperResolver(pre.super_resolution.backend, cfg.char_ldm.resolution,
                             str(cfg.path(cfg.models.super_resolution)), pre.super_resolution.steps)
    rows = super_resolve(rows, resolver)
    masker = BoxMasker(pre.masks.backend, str(cfg.path(cfg.models.sam)))
    return to_tables([add_masks(r, masker) for r in rows])[0].to_pylist()
