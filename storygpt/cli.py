"""``storygpt <subcommand>``: one CLI for every job (LitGPT style).

Each subcommand lives in the module that owns it and is imported only when it runs, so
``storygpt --help`` stays fast and this package never imports Ray itself. Every subcommand
takes ``--config FILE`` and any number of ``--set dotted.key=value``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from storygpt.config import ConfigError
from storygpt.data.errors import DatasetError

# name -> (module, help). Each module defines add_arguments(parser) and run(args); its leaf
# parsers take the shared config options (storygpt.commands.add_config_arguments).
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("storygpt.commands.world", "render the procedural story world (FlintstonesSV layout)"),
    "zoo": ("storygpt.commands.zoo", "build the tiny random models and save them to a model dir"),
    "data": ("storygpt.commands.data", "inspect a dataset: `storygpt data show ...`"),
    "preprocess": ("preprocessing.job", "Ray Data: frames -> super-resolution -> masks -> Parquet records"),
    "train-ldm": ("ray_jobs.train_ldm", "stage 1: train the Char-LDM on Ray Train + DeepSpeed, tracked in MLflow"),
    "precompute": ("preprocessing.precompute", "Ray Data: the trained Char-LDM's fused embeddings + CLIP frame features"),
    "train-aligner": ("ray_jobs.train_aligner", "stage 2: train the aligner on Ray Train + DeepSpeed, tracked in MLflow"),
    "generate": ("storygpt.commands.generate", "draw a story (or continue one) with the trained models"),
    "train-classifier": ("storygpt.commands.classifier", "fine-tune the Inception-v3 frame classifier (Char-/BG-Acc)"),
    "train-captioner": ("storygpt.commands.captioner", "fine-tune the BLIP-2 captioner (BLEU4 / CIDEr); tiny: build it"),
    "evaluate": ("ray_jobs.evaluate", "Ray Data: draw the test stories and score them (paper Table 1)"),
    "serve": ("serving.command", "Ray Serve: the HTTP API (streaming) and web page on 127.0.0.1"),
    "demo": ("ray_jobs.demo", "run the quickstart pipeline on the configured preset"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storygpt", description="StoryGPT-V on Ray: one CLI for every job.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if argv and argv[0] == name:  # import only the subcommand being run
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ConfigError, DatasetError) as err:
        print(f"storygpt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
