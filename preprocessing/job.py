"""storygpt preprocess --config C --input DIR --format F --output DIR

Reads the dataset's stories on the driver (metadata only), then streams every frame of the
configured splits through the Ray Data pipeline. Resumable: a re-run on the same output skips
what is done. Submit to a cluster with ``ray job submit`` (README, "Preprocess").
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import TypedDict

from storygpt.commands import add_config_arguments
from storygpt.config import DATASET_OF_FORMAT, StoryConfig, load_config
from storygpt.data.readers import READERS, ReadOptions, read_stories

KINDS = ("records", "errors")  # the files of one part (storygpt.data.parts)
FINGERPRINT_KEYS = ("data.", "preprocess.super_resolution.", "preprocess.masks.backend", "char_ldm.resolution")


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--input", help="dataset dir (default: data.root)")
    p.add_argument("--format", choices=sorted(READERS), help="default: data.format")
    p.add_argument("--output", help="records dir (default: preprocess.output)")


def run(args) -> int:
    overrides = list(args.overrides)
    overrides += [f"data.root={args.input}"] if args.input else []
    overrides += [f"data.format={args.format}"] if args.format else []
    if args.format and not any(o.startswith("data.dataset=") for o in overrides):  # the layout's own table
        overrides += [f"data.dataset={DATASET_OF_FORMAT[args.format]}"]
    overrides += [f"preprocess.output={args.output}"] if args.output else []
    cfg = load_config(args.config, overrides)
    manifest = preprocess(cfg)
    c = manifest["counts"]
    print(f"preprocess: {c['frames_in']} frames in, {c['records_out']} records out, {c['errors']} errors "
          f"({c['frames_dropped']} frames dropped), {manifest['timings']['total_s']:.1f}s "
          f"({c['frames_already_done']} frames already done) -> {manifest['output']}")
    return 0


class Manifest(TypedDict):
    """What a Ray Data job returns, and writes to ``{output}/manifest.json``: the next step reads ``output``."""
    output: str
    counts: dict[str, int]
    timings: dict[str, float]
    config: dict
    versions: dict[str, str]


class PreprocessManifest(Manifest):
    input: str
    format: str


def preprocess(cfg: StoryConfig) -> PreprocessManifest:
    import pyarrow as pa

    from preprocessing.pipeline import build
    from ray_jobs.runtime import connect_ray
    from storygpt.atomic import replace_bytes
    from storygpt.data import parts
    from storygpt.vision import prepare
    from storygpt.data.characters import get_table
    from storygpt.data.record_schema import ERRORS, read_table

    started = time.perf_counter()
    output = cfg.path(cfg.preprocess.output)
    _check_same_config(cfg, output)
    cfg.require_dir("models.clip_text", "the CLIP tokenizer finds the names' token spans")
    if cfg.preprocess.super_resolution.backend == "ldm":
        cfg.require_dir("models.super_resolution", "preprocess.super_resolution.backend is 'ldm'")
    if cfg.preprocess.masks.backend == "sam":
        cfg.require_dir("models.sam", "preprocess.masks.backend is 'sam'")
    table = get_table(cfg.data.dataset)
    rows, read_errors = [], []
    for split in cfg.preprocess.splits:
        options = ReadOptions(split, cfg.data.frames_per_story, cfg.data.clip_frame, cfg.data.box_source_size,
                              on_error="skip", check_files=False, referential_rule=cfg.data.referential_rule)
        stories, report = read_stories(cfg.data.format, cfg.dataset_root(), table, options)
        rows += [prepare.frame_row(f, split) for s in stories for f in s.frames]
        read_errors += [{"id": s.id, "story_id": s.id, "stage": "read", "reason": f"{s.file}: {s.reason}",
                         "dropped": "story"} for s in report.skipped]
    parts.write_whole(output, "errors", "read", pa.Table.from_pylist(read_errors, ERRORS))
    done, earlier = parts.resume(output, KINDS)
    todo = [r for r in rows if r["id"] not in done]
    read_s = time.perf_counter() - started
    if todo:
        connect_ray()
        written = build(todo, cfg, str(output)).take_all()
    else:
        written = []
    total = earlier + written
    counts = {
        "frames_in": len(rows),
        "frames_already_done": len(rows) - len(todo),
        "records_out": sum(p["records"] for p in total),
        "frames_dropped": sum(p["dropped"] for p in total),
        "stories_skipped_by_reader": len(read_errors),
        "mask_encoder_runs": sum(p["mask_encoder_runs"] for p in total),
        "boxes_masked": sum(p["boxes_masked"] for p in total),
        "parts": len(total),
    }
    counts["errors"] = read_table(output, "errors", columns=["id"]).num_rows  # read.parquet included
    manifest: PreprocessManifest = {
        "output": str(output),
        "input": str(cfg.path(cfg.data.root)),
        "format": cfg.data.format,
        "counts": counts,
        "timings": {"read_s": round(read_s, 2), "pipeline_s": round(time.perf_counter() - started - read_s, 2),
                    "total_s": round(time.perf_counter() - started, 2)},
        "config": cfg.flat(),
        "versions": _versions(),
    }
    replace_bytes(output / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


def _check_same_config(cfg: StoryConfig, output: Path) -> None:
    """A re-run may only resume an output written with the same data and stage settings."""
    from storygpt.data.parts import require_same_settings

    fingerprint = {k: v for k, v in cfg.flat().items() if k.startswith(FINGERPRINT_KEYS)}
    require_same_settings(output / "preprocess_config.json", fingerprint, "preprocess.output", "records",
                          "choose a new --output to keep both")


def _versions() -> dict:
    import diffusers
    import ray
    import segment_anything  # noqa: F401
    import torch
    import transformers

    import storygpt

    return {"storygpt": storygpt.__version__, "ray": ray.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "host": os.uname().nodename}
