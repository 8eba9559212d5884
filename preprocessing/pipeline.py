"""The Ray Data graph: load/validate (tasks) -> super-resolution (actor pool) -> masks (actor
pool) -> write (tasks). Stages stream into each other; nothing is materialised in between."""

from __future__ import annotations

import ray
from ray.data import ActorPoolStrategy

from preprocessing import stages
from storygpt.config import StoryConfig


def _pool(pool) -> dict:
    return dict(
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, batch_size=pool.batch_size,
        resources=dict(pool.resources),  # the node type's custom resource (configs/cluster-*.yaml)
    )


def build(rows: list[dict], cfg: StoryConfig, output: str) -> ray.data.Dataset:
    pre = cfg.preprocess
    sr, masks = pre.super_resolution, pre.masks
    blocks = max(1, -(-len(rows) // pre.rows_per_file))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        stages.load_and_validate, batch_format="pyarrow", num_cpus=pre.task_num_cpus,
        fn_kwargs=dict(dataset=cfg.data.dataset, clip_text_dir=str(cfg.path(cfg.models.clip_text)),
                       dataset_masks=masks.prefer_dataset_masks),
    )
    ds = ds.map_batches(
        stages.SuperResolve, batch_format="pyarrow", **_pool(sr.pool),
        fn_constructor_kwargs=dict(
            backend=sr.backend, out_size=cfg.char_ldm.resolution, model_dir=str(cfg.path(cfg.models.super_resolution)),
            steps=sr.steps, threads=pre.torch_threads, num_gpus=sr.pool.num_gpus,
        ),
    )
    ds = ds.map_batches(
        stages.Mask, batch_format="pyarrow", **_pool(masks.pool),
        fn_constructor_kwargs=dict(
            backend=masks.backend, sam_dir=str(cfg.path(cfg.models.sam)), threads=pre.torch_threads,
            num_gpus=masks.pool.num_gpus,
        ),
    )
    return ds.map_batches(
        stages.write, batch_format="pyarrow", batch_size=pre.rows_per_file, num_cpus=pre.task_num_cpus,
        fn_kwargs=dict(output=output),
    )
