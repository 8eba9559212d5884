"""Subcommands of the ``storygpt`` CLI that need no Ray, and the options they all share."""

from __future__ import annotations

import argparse

from storygpt.config import DEFAULT_PRESET


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    # default None (= DEFAULT_PRESET in load_config), so a command can tell whether it was given
    parser.add_argument("--config", default=None, metavar="PRESET",
                        help=f"a bundled preset's name (tiny, world, flintstones, pororo, cluster-flintstones) "
                             f"or a preset YAML path (default: {DEFAULT_PRESET})")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set char_ldm.learning_rate=2e-5 (repeatable)",
    )
