"""Shared fixtures. Everything runs on CPU, offline, in temp dirs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

import storygpt  # noqa: E402,F401  (installs the torchvision shim before anything imports it)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_tracking_uri_leaks_between_tests():
    """``mlflow.set_tracking_uri`` also exports $MLFLOW_TRACKING_URI, which ``tracking_uri(cfg)``
    prefers to the work dir's own sqlite: a test that set it would send every later test's runs
    into its database. Restore both after each test."""
    import sys

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(before)  # None: unset, env var included
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


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


def start_local_ray():
    """The session's local Ray, its state in a short temp dir (socket paths are limited).
    Also what a module that needs its own Ray (tests/test_fault_tolerance.py: a multi-node
    cluster) calls to put ``ray_local``'s Ray back when it is done."""
    import tempfile

    import ray

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (a module may swap it for its own meanwhile: it restores it)."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_work(tmp_path_factory) -> Path:
    """A work dir with the tiny zoo and a small story world, as `storygpt demo` lays it out."""
    from storygpt.commands.zoo import build_zoo_quietly
    from storygpt.config import load_config

    work = tmp_path_factory.mktemp("work")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"work_dir={work}"])
    build_zoo_quietly(cfg, work / "zoo")
    from storygpt.world.generate import generate_world

    # 20 stories: episodes of two, so the test split holds runs longer than one story (long stories)
    generate_world(work / "world", stories=20, seed=5, image_size=128, clip_frames=2,
                   val_fraction=0.2, test_fraction=0.2)
    return work


@pytest.fixture(scope="session")
def records(ray_local, tiny_work, tmp_path_factory) -> Path:
    """`tiny_work`'s world preprocessed into records on the local Ray (shared by the Ray tests)."""
    from preprocessing.job import preprocess
    from storygpt.config import load_config

    out = tmp_path_factory.mktemp("records")
    preprocess(load_config(REPO / "configs" / "tiny.yaml", [f"work_dir={tiny_work}", f"preprocess.output={out}"]))
    return out
