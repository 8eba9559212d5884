"""Subcommands of the ``storygpt`` CLI that need no Ray, and the options they all share."""

from __future__ import annotations

import argparse

DEFAULT_CONFIG = "configs/tiny.yaml"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"preset YAML (default: {DEFAULT_CONFIG})")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set char_ldm.learning_rate=2e-5 (repeatable)",
    )
