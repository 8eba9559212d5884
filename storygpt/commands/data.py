"""storygpt data show --format F --root DIR [--dataset D] [--referential] [--split S] [--limit K] [--long N] [--json]

The character table (names, genders for the pronouns) is ``--dataset``; else, when ``--format``
is given, the table of that layout's own release (flintstones, storygptv: Flintstones; pororo:
Pororo); else the preset's ``data.dataset``.
"""

from __future__ import annotations

import json
import sys
from typing import get_args

from storygpt.commands import add_config_arguments
from storygpt.config import DATASET_OF_FORMAT, Dataset, load_config
from storygpt.data.characters import get_table
from storygpt.data.readers import READERS, ReadOptions, read_long_stories, read_stories


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    show = sub.add_parser("show", help="print the stories a dataset dir holds")
    add_config_arguments(show)
    show.add_argument("--format", choices=sorted(READERS), help="default: data.format")
    show.add_argument("--root", help="dataset dir (default: data.root)")
    show.add_argument("--dataset", choices=get_args(Dataset),
                      help="character table (default: the --format's own dataset, else data.dataset)")
    show.add_argument("--split", choices=["train", "val", "test"], help="default: data.split")
    show.add_argument("--limit", type=int, help="at most this many stories")
    show.add_argument("--long", type=int, metavar="N",
                      help="long stories instead: runs of N consecutive frames, each frame once (paper Table 5)")
    show.add_argument("--referential", action="store_true", help="include the referential captions")
    show.add_argument("--json", action="store_true", help="one JSON object per story")
    show.add_argument("--skip-bad", action="store_true", help="skip and count bad items instead of stopping")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    root = args.root or cfg.dataset_root()
    table = get_table(args.dataset or (DATASET_OF_FORMAT[args.format] if args.format else cfg.data.dataset))
    options = ReadOptions(
        split=args.split or cfg.data.split,
        frames_per_story=cfg.data.frames_per_story,
        clip_frame=cfg.data.clip_frame,
        box_source_size=cfg.data.box_source_size,
        on_error="skip" if args.skip_bad else cfg.data.on_error,
        limit=args.limit,
        referential_rule=cfg.data.referential_rule,
    )
    fmt = args.format or cfg.data.format
    if args.long is not None:
        stories, report = read_long_stories(fmt, root, table, options, args.long)
    else:
        stories, report = read_stories(fmt, root, table, options)
    for story in stories:
        frames = [
            {
                "id": f.id, "caption": f.caption,
                **({"referential_caption": f.referential_caption} if args.referential else {}),
                "characters": f.characters, "boxes": [list(b) if b else None for b in f.boxes],
                "setting": f.setting,
            }
            for f in story.frames
        ]
        if args.json:
            print(json.dumps({"story_id": story.story_id, "frames": frames}))
        else:
            print(f"story {story.story_id}")
            for f in frames:
                text = f.get("referential_caption") or f["caption"]
                print(f"  {f['id']}  [{', '.join(f['characters']) or '-'}]  {f['setting'] or '-'}  {text}")
    frames = [f for s in stories for f in s.frames]
    pronouns = sum(f.referential_caption != f.caption for f in frames)
    referential = {"rule": options.referential_rule, "pronoun_frames": pronouns,
                   "pronoun_share": round(pronouns / len(frames), 4) if frames else None}
    print(json.dumps({"report": report.summary(), "referential": referential}), file=sys.stderr)
    return 0
