"""storygpt train-ldm: stage 1, the Char-LDM, on Ray Train + DeepSpeed ZeRO, tracked in MLflow.

A recipe in the torchtune sense: setup -> train -> save_checkpoint -> export. The training
step itself (fuser, L_reg, conditioning schedule) is ``storygpt.char_ldm``; this file only
places it on Ray workers inside a DeepSpeed engine. Resume: re-run with ``--resume``
(the latest run) or ``--resume NAME``; a worker restarted by Ray resumes the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from storygpt.commands import add_config_arguments
from storygpt.config import ConfigError, StoryConfig, load_config

if TYPE_CHECKING:  # the runtime (torch, DeepSpeed) loads with the job, not with the CLI
    from ray_jobs.runtime import TrainSummary

RUN_PREFIX = "char_ldm"


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--records", help="preprocessed records dir (default: preprocess.output)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue the latest run (or RUN) from its last checkpoint")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides).resolved()
    summary = fit(cfg, args.records, args.resume)
    print(json.dumps(summary))
    return 0


def fit(cfg: StoryConfig, records: str | None = None, resume: bool | str = False) -> TrainSummary:
    """Driver side: datasets, trainer, fit. Returns a summary of the finished run."""
    import ray

    from ray_jobs.runtime import connect_ray, fit_trainer, run_name
    from storygpt.data.parts import finished_files

    records_dir = Path(records or cfg.preprocess.output)
    files = finished_files(records_dir, "records")
    if not files:
        raise ConfigError(f"--records: no Parquet records in '{records_dir / 'records'}' "
                          "(run `storygpt preprocess` first)")
    cfg.require_dir("models.unet")
    connect_ray()
    name = run_name(Path(cfg.train.storage_path), RUN_PREFIX, resume)
    train = ray.data.read_parquet(files).filter(lambda row: row["split"] == "train")
    return fit_trainer(cfg, "char_ldm", train_loop, {}, name, {"train": train})


# ----------------------------------------------------------------------------- on each worker
def train_loop(config: dict) -> None:
    import torch
    import torch.distributed as dist

    from ray_jobs.runtime import MetricWindow, export_trained, report_checkpoint, start_worker
    from storygpt.char_ldm.data import collate
    from storygpt.char_ldm.model import CharLDM

    # --- setup
    w = start_worker(config, "char_ldm", CharLDM.from_config)
    cfg, ldm, train, model, engine, tracker = w.cfg, w.stage, w.cfg.train, w.model, w.engine, w.tracker
    step, micro, device = engine.global_steps, w.micro, engine.device
    generator = torch.Generator().manual_seed(cfg.seed * 10_007 + w.rank * 101 + step)  # resumes draw new noise

    # --- train
    window = MetricWindow(METRICS, counters=("samples",))
    last, sample_rows = {}, None
    while step < ldm.max_steps:
        rows = next(w.batches)
        batch = {k: v.to(device) for k, v in collate(rows.to_pylist(), model, ldm, generator).items()}
        out = engine(batch, generator)
        engine.backward(out["loss"])
        engine.step()
        window.update(out, samples=micro)  # summed over ranks at collect
        if engine.global_steps == step:
            continue  # mid gradient accumulation: no optimizer step yet
        step = engine.global_steps
        if step % ldm.log_every == 0 or step == ldm.max_steps:
            last = {**window.collect(dist), "lr": w.scheduler.get_last_lr()[0]}
            tracker.log(last, step)
        if step % ldm.sample_every == 0:
            # every rank draws the same samples: under ZeRO-3 each module call gathers its weights
            sample_rows = sample_rows or _broadcast(rows.to_pylist(), dist)
            _log_samples(tracker, engine.module, sample_rows, cfg, step)
        if step % train.checkpoint_every == 0 or step == ldm.max_steps:
            report_checkpoint(engine, w.optimizer, step, tracker, last, w.state, w.restored, dist)

    # --- export (every rank gathers under ZeRO-3; rank 0 writes and logs)
    export_trained(engine, cfg, "char_ldm", config["run_name"], w.rank, tracker)
    tracker.end()


METRICS = ("loss", "noise_loss", "lreg", "attn_in_mask_ratio")


def _broadcast(rows: list[dict], dist) -> list[dict]:
    """Rank 0's rows on every rank."""
    box = [rows]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _log_samples(tracker, model, rows: list[dict], cfg: StoryConfig, step: int) -> None:
    """A sample grid for the batch's captions and the characters' cross-attention maps (Fig. 5)."""
    from storygpt.char_ldm.logging_images import attention_figure, sample_grid

    tracker.image(sample_grid(model, rows, cfg), f"samples/step_{step:07d}.png")
    tracker.image(attention_figure(model, rows, cfg), f"attention/step_{step:07d}.png")
