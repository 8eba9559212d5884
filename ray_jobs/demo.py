"""storygpt demo: the quickstart pipeline on a preset (default: tiny).

Today it runs the stages that exist: render the story world, build the tiny model zoo,
summarise the dataset the way the training jobs will read it, and preprocess it into records
on a local Ray. Each later stage (train Char-LDM, precompute, train aligner, evaluate, serve)
is added here as it lands.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from storygpt.commands import add_config_arguments
from storygpt.config import ConfigError, StoryConfig, load_config


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--work-dir", help="where everything is written (overrides work_dir)")


def run(args) -> int:
    overrides = list(args.overrides) + ([f"work_dir={args.work_dir}"] if args.work_dir else [])
    cfg = load_config(args.config, overrides)
    if cfg.data.world is None or cfg.zoo is None:
        raise ConfigError("demo: needs a preset with data.world and zoo (configs/tiny.yaml)")
    started = time.perf_counter()
    steps = [("story world", _world), ("tiny model zoo", _zoo), ("dataset summary", _summary),
             ("preprocess (Ray Data)", _preprocess)]
    results = {}
    for i, (name, step) in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {name} ...", flush=True)
        t = time.perf_counter()
        results[name] = step(cfg)
        print(f"      done in {time.perf_counter() - t:.1f}s: {json.dumps(results[name])}", flush=True)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s (preset '{cfg.preset}', work dir {cfg.work_dir})")
    root = results["story world"]["root"]
    print(f"  dataset:  {root}  (inspect: storygpt data show --referential --root {root})")
    print(f"  models:   {results['tiny model zoo']['zoo']}")
    print(f"  records:  {results['preprocess (Ray Data)']['output']}  (manifest.json, records/, errors/)")
    print("  not yet in the demo: train Char-LDM, precompute, train aligner, evaluate, serve")
    return 0


def _world(cfg: StoryConfig) -> dict:
    from storygpt.world.generate import generate_world

    w = cfg.data.world
    root = cfg.path(cfg.data.root)
    s = generate_world(root, w.stories, w.seed, w.image_size, w.clip_frames, w.val_fraction, w.test_fraction)
    return {"root": str(root), "stories": s.stories, "frames": s.frames, "splits": s.splits}


def _zoo(cfg: StoryConfig) -> dict:
    from storygpt.commands.zoo import build_zoo_quietly

    out = cfg.path("{work_dir}/zoo")
    parts = build_zoo_quietly(cfg, out)
    return {"zoo": str(out), "parts": sorted(parts)}


def _summary(cfg: StoryConfig) -> dict:
    from storygpt.data.characters import get_table
    from storygpt.data.readers import ReadOptions, read_stories

    table = get_table(cfg.data.dataset)
    out = {}
    for split in ("train", "val", "test"):
        options = ReadOptions(split, cfg.data.frames_per_story, cfg.data.clip_frame,
                              cfg.data.box_source_size, cfg.data.on_error)
        stories, report = read_stories(cfg.data.format, cfg.path(cfg.data.root), table, options)
        frames = [f for s in stories for f in s.frames]
        out[split] = {
            "stories": report.stories,
            "frames": report.frames,
            "skipped": len(report.skipped),
            "pronoun_frames": sum(f.referential_caption != f.caption for f in frames),
            "with_masks": sum(f.masks is not None for f in frames),
        }
        if split == "train":
            counts = Counter(name for f in frames for name in f.characters)
            out["character_frames"] = dict(sorted(counts.items()))
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.work_dir) / "dataset_summary.json").write_text(json.dumps(out, indent=1))
    return out


def _preprocess(cfg: StoryConfig) -> dict:
    from preprocessing.job import preprocess

    manifest = preprocess(cfg)
    return {"output": manifest["output"], **manifest["counts"], "seconds": manifest["timings"]["total_s"]}
