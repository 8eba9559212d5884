"""storygpt generate --caption "…" --caption "…" [--continue K] --out DIR

Draws a story with the trained aligner and Char-LDM (no Ray): frame i from every earlier frame
and caption (the LM's KV cache is kept across frames). Writes ``frame_NN.png`` as each frame is
drawn, then ``story.png`` (the frames upscaled, each caption under its frame) and ``story.json`` (captions, which were written by the LM).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from storygpt.commands import add_config_arguments
from storygpt.config import ConfigError, load_config
from storygpt.story_grid import story_grid


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--caption", action="append", default=[], help="one frame's caption (repeat, in order)")
    p.add_argument("--continue", dest="continue_frames", type=int, default=0, metavar="K",
                   help="then let the LM write K more captions and draw them (paper appendix A)")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--char-ldm", help="trained Char-LDM dir (default: models.char_ldm, else the latest export)")
    p.add_argument("--aligner", help="trained aligner dir (default: models.aligner, else the latest export)")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if not args.caption:
        raise ConfigError("--caption: give at least one caption")
    if args.continue_frames < 0:
        raise ConfigError(f"--continue: expected K >= 0, got {args.continue_frames}")
    story = build_story_pipeline(cfg, args.char_ldm, args.aligner)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, frames = time.perf_counter(), []
    if args.continue_frames:
        stream = story.continue_story(args.caption, args.continue_frames, seed=args.seed)
    else:
        stream = story.stream(args.caption, seed=args.seed)
    for frame in stream:
        path = out / f"frame_{frame.index:02d}.png"
        Image.fromarray(frame.image).save(path)
        frames.append({"index": frame.index, "caption": frame.caption, "written": frame.written, "image": path.name})
        print(f"frame {frame.index}: {path}  ({'written by the LM: ' if frame.written else ''}{frame.caption!r})",
              flush=True)
    images = [np.asarray(Image.open(out / f["image"]).convert("RGB")) for f in frames]
    story_grid(images, [f["caption"] for f in frames]).save(out / "story.png")  # upscaled, captioned
    summary = {"frames": frames, "grid": "story.png", "seed": args.seed, "seconds": round(time.perf_counter() - started, 2)}
    (out / "story.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({"out": str(out), "grid": str(out / "story.png"), "frames": len(frames)}))
    return 0


def build_story_pipeline(cfg, char_ldm_dir=None, aligner_dir=None, device: str = "cpu"):
    """The trained aligner and Char-LDM (given dirs, else the preset's, else the latest exports)."""
    from storygpt.models.trained import trained_dir
    from storygpt.pipeline import StoryGPTPipeline

    return StoryGPTPipeline.from_pretrained(cfg, trained_dir(cfg, "char_ldm", char_ldm_dir),
                                            trained_dir(cfg, "aligner", aligner_dir), device)
