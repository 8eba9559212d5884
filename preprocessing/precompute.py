"""storygpt precompute --config C [--records DIR] [--char-ldm DIR]

Stage-2 targets: runs the trained Char-LDM's conditioning parts over the preprocessed records
and stores, per frame, its fused embedding c_i and its CLIP frame feature
(:mod:`storygpt.char_ldm.targets`), so that stage-2 training never loads the UNet.

Ray Data: read the records' Parquet (the columns the targets need) -> an autoscaling actor pool
(``precompute.pool``) -> write tasks, each writing one atomic part + its done marker into
``precompute.output``. Resumable like ``preprocess``: a re-run skips the records a marker lists;
an output made with another Char-LDM (or other settings) is refused, never mixed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa

from preprocessing.job import Manifest
from storygpt.commands import add_config_arguments
from storygpt.config import ConfigError, StoryConfig, load_config

def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--records", help="records dir (default: preprocess.output)")
    p.add_argument("--char-ldm", dest="char_ldm",
                   help="trained Char-LDM dir (default: models.char_ldm, else the latest export under "
                        "{work_dir}/char_ldm/)")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    manifest = precompute(cfg, records=args.records, char_ldm=args.char_ldm)
    c, t = manifest["counts"], manifest["timings"]
    s = manifest["shape"]
    print(f"precompute: {c['records_in']} records, {c['computed']} computed "
          f"({c['records_per_s']:.1f} records/s), {c['already_done']} already done, {c['targets_out']} targets "
          f"({s['tokens']}x{s['dim']} fused + {s['clip_dim']} frame feature) in {t['total_s']:.1f}s "
          f"-> {manifest['output']} (Char-LDM: {manifest['char_ldm']})")
    return 0


class TargetsManifest(Manifest):
    """``precompute``'s manifest: train-aligner reads ``output``."""
    records: str
    char_ldm: str
    shape: dict


def precompute(cfg: StoryConfig, records: str | Path | None = None,
               char_ldm: str | Path | None = None) -> TargetsManifest:
    from preprocessing.job import _versions
    from ray_jobs.runtime import connect_ray
    from storygpt.atomic import replace_bytes
    from storygpt.char_ldm.targets import PARTS, read_targets, target_shape
    from storygpt.data.parts import resume

    started = time.perf_counter()
    cfg = cfg.resolved()  # absolute paths: Ray workers run elsewhere
    records_dir = Path(records).resolve() if records else Path(cfg.preprocess.output)
    trained = find_char_ldm(cfg, char_ldm)
    output = Path(cfg.precompute.output)
    shape = target_shape(cfg, trained)
    _check_same_inputs(cfg, output, records_dir, trained, shape)
    done, earlier = resume(output, [PARTS])
    files, records_in, todo = _records_to_do(records_dir, done)
    read_s = time.perf_counter() - started
    parts = []
    if todo:
        connect_ray()
        parts = build(files, done, cfg, trained, output).take_all()
    pipeline_s = time.perf_counter() - started - read_s
    total = earlier + parts
    ids = read_targets(output, columns=["id"])["id"].to_pylist()
    computed = sum(p["records"] for p in parts)
    counts = {
        "records_in": records_in,
        "already_done": records_in - todo,
        "computed": computed,
        "targets_out": len(ids),
        "duplicates": len(ids) - len(set(ids)),
        "parts": len(total),
        "records_per_s": round(computed / pipeline_s, 2) if computed else 0.0,
    }
    manifest: TargetsManifest = {
        "output": str(output),
        "records": str(records_dir),
        "char_ldm": str(trained),
        "shape": shape,
        "counts": counts,
        "timings": {"read_s": round(read_s, 2), "pipeline_s": round(pipeline_s, 2),
                    "total_s": round(time.perf_counter() - started, 2)},
        "config": cfg.flat(),
        "versions": _versions(),
    }
    replace_bytes(output / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


def find_char_ldm(cfg: StoryConfig, given: str | Path | None = None) -> Path:
    """``given`` (--char-ldm), else ``models.char_ldm``, else the newest export under
    {work_dir}/char_ldm/ (:func:`storygpt.models.trained.trained_dir`); it must be a finished export."""
    from storygpt.models.trained import trained_dir

    path = trained_dir(cfg, "char_ldm", given)
    # vision/config.json is the last file save_trained writes: without it the export is unfinished
    if not all((path / part / "config.json").is_file() for part in ("fuser", "vision")):
        source = "--char-ldm" if given is not None else "models.char_ldm"
        raise ConfigError(f"{source}: '{path}' is not a finished Char-LDM export (train-ldm writes unet/, "
                          "fuser/, vision/ there)")
    return path.resolve()


def build(files: list[str], done: set[str], cfg: StoryConfig, trained: Path, output: Path):
    """records -> (drop done ids) -> targets (actor pool) -> parts (write tasks)."""
    import ray
    from ray.data import ActorPoolStrategy

    from storygpt.char_ldm.targets import RECORD_COLUMNS

    pool, task_cpus = cfg.precompute.pool, cfg.preprocess.task_num_cpus
    ds = ray.data.read_parquet(files, columns=RECORD_COLUMNS, num_cpus=task_cpus, override_num_blocks=len(files))
    if done:
        ds = ds.map_batches(_drop_done, batch_format="pyarrow", num_cpus=task_cpus,
                            fn_kwargs=dict(done=sorted(done)))
    ds = ds.map_batches(
        ComputeTargets, batch_format="pyarrow", batch_size=pool.batch_size,
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, resources=dict(pool.resources),
        fn_constructor_kwargs=dict(cfg=cfg.model_dump(mode="json"), char_ldm=str(trained),
                                   threads=cfg.preprocess.torch_threads, num_gpus=pool.num_gpus),
    )
    return ds.map_batches(write_targets, batch_format="pyarrow", batch_size=cfg.preprocess.rows_per_file,
                          num_cpus=task_cpus, fn_kwargs=dict(output=str(output)))


# ----------------------------------------------------------------------------- stages
def _drop_done(batch: pa.Table, done: list[str]) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.invert(pc.is_in(batch["id"], value_set=pa.array(done, pa.string()))))


class ComputeTargets:
    """The actor: one :class:`~storygpt.char_ldm.targets.StageTwoTargets` per process."""

    def __init__(self, cfg: dict, char_ldm: str, threads: int, num_gpus: float):
        import torch

        from storygpt.char_ldm.targets import StageTwoTargets
        from storygpt.training import pick_device

        torch.set_num_threads(threads)
        self.targets = StageTwoTargets(StoryConfig.model_validate(cfg), char_ldm, device=pick_device(num_gpus))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from storygpt.char_ldm.targets import TARGETS

        return pa.Table.from_pylist(self.targets(batch.to_pylist()), TARGETS)


def write_targets(batch: pa.Table, output: str) -> pa.Table:
    """Write one part (targets, then its done marker); return its stats as one row."""
    from storygpt.char_ldm.targets import PARTS
    from storygpt.data.parts import write_part

    ids = batch["id"].to_pylist()
    name = write_part(output, ids, {PARTS: batch}, {"records": len(ids)})  # a retried task rewrites the same part
    return pa.Table.from_pylist([{"part": name, "records": len(ids), "finished_at": time.time()}])


# ----------------------------------------------------------------------------- driver helpers
def _records_to_do(records_dir: Path, done: set[str]) -> tuple[list[str], int, int]:
    """(record files with work left, records in all, records to compute); reads ids only, of
    preprocess's finished parts (:func:`storygpt.data.parts.finished_files`)."""
    import pyarrow.parquet as pq

    from storygpt.data.parts import finished_files

    files = finished_files(records_dir, "records")
    if not files:
        raise ConfigError(f"preprocess.output: '{records_dir}' holds no finished records; run `storygpt preprocess` "
                          "(or pass --records)")
    todo_files, records_in, todo = [], 0, 0
    for f in files:
        ids = pq.read_table(f, columns=["id"])["id"].to_pylist()
        left = sum(i not in done for i in ids)
        records_in, todo = records_in + len(ids), todo + left
        if left:
            todo_files.append(f)
    return todo_files, records_in, todo


def _check_same_inputs(cfg: StoryConfig, output: Path, records: Path, trained: Path, shape: dict) -> None:
    """A re-run may only add to an output made from the same records, Char-LDM and settings."""
    from storygpt.data.parts import require_same_settings
    from storygpt.char_ldm.targets import INFO

    info = {
        "char_ldm": str(trained),
        "records": str(records),
        "models.clip_text": cfg.models.clip_text,
        "models.clip_vision": cfg.models.clip_vision,
        "char_ldm.max_characters": cfg.char_ldm.max_characters,
        "char_ldm.resolution": cfg.char_ldm.resolution,
        "seed": cfg.seed,  # seeds the crops' noise fill
        "precompute.target": cfg.precompute.target,
        "shape": shape,
    }
    path = output / INFO
    if path.is_file():
        before = json.loads(path.read_text()).get("char_ldm")
        if before != info["char_ldm"]:  # the likely mistake, said plainly
            raise ConfigError(f"precompute.output: '{output}' holds targets of the Char-LDM '{before}', not "
                              f"'{trained}'; set precompute.output to a new dir (or remove the old one) rather "
                              "than mix the two")
    require_same_settings(path, info, "precompute.output", "targets", "set precompute.output to a new dir to keep both")
