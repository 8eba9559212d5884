"""storygpt world --out DIR --stories N --seed S"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from storygpt.commands import add_config_arguments
from storygpt.config import ConfigError, load_config
from storygpt.world.generate import generate_world


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--out", help="output dir (default: data.root of the config)")
    p.add_argument("--stories", type=int, help="number of 5-frame stories (default: data.world.stories)")
    p.add_argument("--seed", type=int, help="random seed (default: data.world.seed)")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    world = cfg.data.world
    if world is None:
        raise ConfigError("data.world: required by `storygpt world` (see configs/tiny.yaml)")
    stories = args.stories if args.stories is not None else world.stories
    if stories <= 0:
        raise ConfigError(f"--stories: expected a positive number, got {stories}")
    out = args.out or cfg.path(cfg.data.root)
    start = time.perf_counter()
    summary = generate_world(
        out, stories, args.seed if args.seed is not None else world.seed, world.image_size,
        world.clip_frames, world.val_fraction, world.test_fraction,
    )
    print(json.dumps({**asdict(summary), "seconds": round(time.perf_counter() - start, 2)}))
    return 0
