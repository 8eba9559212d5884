"""Shared fixtures. Everything runs on CPU, offline, in temp dirs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

import storygpt  # noqa: E402,F401  (installs the torchvision shim before anything imports it)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> Path:
    """A small story world shared by the read-only tests."""
    from storygpt.world.generate import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, stories=24, seed=3, image_size=128, clip_frames=2, val_fraction=0.25, test_fraction=0.25)
    return root
