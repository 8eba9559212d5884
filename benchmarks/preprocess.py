"""Preprocessing throughput: records/s with 1 and with 2 actors per pool, on the tiny models.

Runs the real Ray Data pipeline (tiny LDM 4x upscaler + tiny SAM on a story world) twice in one
Ray session, once with every actor pool pinned to 1 actor and once to 2, and reports
``scaling`` = their ratio (target >= 1.7). Throughput is steady state: frames written after the
first part finished, over the time from then to the last part (actor start-up, which imports
torch and loads the models, is excluded; it is reported separately as ``startup_s``). Each actor gets one torch thread, so on a machine
with >= 2 cores the pools can scale. GPU figures (real-size SAM ViT-H / LDM-SR) need a GPU
and are reported only when one is present.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rows(cfg):
    from storygpt.vision import prepare
    from storygpt.data.characters import get_table
    from storygpt.data.readers import ReadOptions, read_stories

    stories, _ = read_stories("flintstones", cfg.path(cfg.data.root), get_table("world"),
                              ReadOptions("train", check_files=False))
    return [prepare.frame_row(f, "train") for s in stories for f in s.frames]


def run_once(cfg, rows, actors: int, out: Path) -> tuple[float, float]:
    """(steady-state records/s, seconds until the first part was written)."""
    from preprocessing.pipeline import build
    from storygpt.config import load_config

    pool = f"{{min_actors: {actors}, max_actors: {actors}, num_cpus: 0.4, num_gpus: 0, batch_size: 4}}"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"work_dir={cfg.work_dir}", f"preprocess.super_resolution.pool={pool}", f"preprocess.masks.pool={pool}",
        "preprocess.rows_per_file=4", "preprocess.super_resolution.backend=ldm", "preprocess.super_resolution.steps=8",
        "preprocess.masks.backend=sam", "preprocess.masks.prefer_dataset_masks=false",
    ])
    start = time.time()
    parts = sorted(build(rows, cfg, str(out)).take_all(), key=lambda p: p["finished_at"])
    assert sum(p["records"] for p in parts) == len(rows)
    steady = sum(p["frames"] for p in parts[1:]) / (parts[-1]["finished_at"] - parts[0]["finished_at"])
    return steady, parts[0]["finished_at"] - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer frames (CI smoke run)")
    args = parser.parse_args()

    import ray

    import storygpt  # noqa: F401
    from benchmarks.common import emit
    from storygpt.commands.zoo import build_zoo_quietly
    from storygpt.config import load_config
    from storygpt.world.generate import generate_world

    work = Path(tempfile.mkdtemp(prefix="bench-pre-"))
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"work_dir={work}"])
    build_zoo_quietly(cfg, work / "zoo")
    stories = 10 if args.quick else 24
    generate_world(work / "world", stories, seed=0, val_fraction=0, test_fraction=0)
    rows = _rows(cfg)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    try:
        one, startup_one = run_once(cfg, rows, 1, work / "out1")
        two, startup_two = run_once(cfg, rows, 2, work / "out2")
    finally:
        ray.shutdown()
    emit({"benchmark": "preprocess", "device": "cpu", "models": "tiny LDM-SR (8 steps) + tiny SAM",
          "frames": len(rows), "records_per_s_1_actor": round(one, 2), "records_per_s_2_actors": round(two, 2),
          "scaling": round(two / one, 3), "target_scaling": 1.7,
          "startup_s": {"1_actor": round(startup_one, 1), "2_actors": round(startup_two, 1)},
          "gpu": "not measured: no GPU on this machine"})


if __name__ == "__main__":
    main()
