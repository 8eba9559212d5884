"""storygpt train-aligner: stage 2, the aligner, on Ray Train + DeepSpeed ZeRO, tracked in MLflow.

The same recipe shape as ``train_ldm``: a frozen LM with new trainable parts
(``storygpt.aligner``) inside a DeepSpeed engine per worker; ZeRO-3 shards the frozen LM across
workers so large LMs fit. Training reads only the precomputed targets (``storygpt precompute``):
captions, CLIP frame features and fused embeddings, never the UNet.

Examples: every story prefix ``(I_1, S_1, …, S_n, [IMG])`` with the *referential* captions as
input and frame n's fused embedding of the *original* caption as the target. Reference accuracy
(``storygpt.aligner.metrics``) is measured on held-out pronoun frames (the val split) against
candidate casts of each frame's own caption, fused once before training by a Ray task with the
Char-LDM's encoders (the UNet is not loaded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from storygpt.commands import add_config_arguments
from storygpt.config import ConfigError, StoryConfig, load_config

if TYPE_CHECKING:  # the runtime (torch, DeepSpeed) loads with the job, not with the CLI
    from ray_jobs.runtime import TrainSummary

RUN_PREFIX = "aligner"
METRICS = ("loss", "gen_loss", "align_loss")


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--targets", help="precomputed targets dir (default: precompute.output)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue the latest run (or RUN) from its last checkpoint")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides).resolved()
    summary = fit(cfg, args.targets, args.resume)
    print(json.dumps(summary))
    return 0


def fit(cfg: StoryConfig, targets: str | None = None, resume: bool | str = False) -> TrainSummary:
    """Driver side: story examples, centroids, trainer, fit. Returns a summary of the finished run."""
    import ray

    from ray_jobs.runtime import connect_ray, fit_trainer, run_name
    from storygpt.char_ldm.targets import read_target_info, target_files

    output = str(Path(targets or cfg.precompute.output).resolve())
    try:
        files = target_files(output)
    except FileNotFoundError as err:
        raise ConfigError(f"precompute.output: {err}") from None
    # the workers' config names the targets used: the MLflow story model finds its Char-LDM there
    cfg = cfg.model_copy(update={"precompute": cfg.precompute.model_copy(update={"output": output})})
    cfg.require_dir("models.lm")
    connect_ray()
    name = run_name(Path(cfg.train.storage_path), RUN_PREFIX, resume)
    frames = ray.data.read_parquet(files)
    # built once: unmaterialized, every epoch would re-run the read, the shuffle by story and
    # story_examples (~10 s an epoch on the world, most of each step's time)
    train = _examples(frames.filter(lambda row: row["split"] == "train")).materialize()
    held_out = _examples(frames.filter(lambda row: row["split"] == "val")).filter(lambda row: row["pronoun"])
    evaluation = held_out.take(cfg.aligner.eval_frames)
    candidates = _candidates(cfg, read_target_info(output), evaluation)
    loop_config = {"evaluation": ray.put(evaluation), "candidates": ray.put(candidates)}
    summary = fit_trainer(cfg, "aligner", train_loop, loop_config, name, {"train": train})
    return {**summary, "eval_frames": len(evaluation)}


def _examples(frames):
    """One row per story prefix (``storygpt.aligner.data.story_examples``), grouped by story."""
    import pyarrow as pa

    from storygpt.aligner.data import story_examples

    def per_story(group: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(story_examples(group.to_pylist()))

    return frames.groupby("story_id").map_groups(per_story, batch_format="pyarrow")


def _candidates(cfg: StoryConfig, info: dict, evaluation: list[dict]) -> list:
    """Per held-out frame, the fused embeddings of its candidate casts (right cast first), as
    (K, L*d) float32 arrays: one Ray task that loads the Char-LDM's encoders the targets were
    made with and the train split's reference crops, before any training worker starts."""
    import ray

    if not evaluation:
        return []
    pool = cfg.precompute.pool
    task = ray.remote(num_cpus=min(1.0, pool.num_cpus), num_gpus=pool.num_gpus,
                      resources=dict(pool.resources))(_fuse_candidates)
    frames = [(str(e["caption"]), [str(c) for c in e["characters"]]) for e in evaluation]
    return ray.get(task.remote(cfg.resolved().model_dump(mode="json"), info["char_ldm"], info["records"], frames))


def _fuse_candidates(cfg: dict, char_ldm: str, records: str, frames: list[tuple[str, list[str]]]) -> list:
    import torch

    from storygpt.aligner.metrics import fused_candidates
    from storygpt.char_ldm.references import train_reference_crops
    from storygpt.char_ldm.targets import StageTwoTargets
    from storygpt.data.characters import get_table
    from storygpt.training import pick_device

    config = StoryConfig.model_validate(cfg)
    torch.set_num_threads(1)
    encoder = StageTwoTargets(config, char_ldm, device=pick_device(config.precompute.pool.num_gpus))
    table = get_table(config.data.dataset)
    references = train_reference_crops(Path(records), table.names, config.seed)
    return [fused.flatten(1).cpu().numpy() for fused in fused_candidates(encoder, frames, references, table)]


# ----------------------------------------------------------------------------- on each worker
def train_loop(config: dict) -> None:
    import ray
    import torch.distributed as dist

    from ray_jobs.runtime import MetricWindow, export_trained, report_checkpoint, start_worker
    from storygpt.aligner.data import collate
    from storygpt.aligner.model import StoryAligner

    # --- setup
    w = start_worker(config, "aligner", StoryAligner.from_config)
    cfg, stage, train, aligner, engine, tracker = w.cfg, w.stage, w.cfg.train, w.model, w.engine, w.tracker
    step, micro, device = engine.global_steps, w.micro, engine.device
    evaluation, candidates = ray.get(config["evaluation"]), ray.get(config["candidates"])

    # --- train
    window = MetricWindow(METRICS, counters=("tokens", "samples"))
    last = {}
    while step < stage.max_steps:
        rows = next(w.batches)
        batch = {k: v.to(device) for k, v in collate(rows.to_pylist(), aligner).items()}
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
        window.update(out, tokens=float(batch["attention_mask"].sum()), samples=micro)
        if engine.global_steps == step:
            continue  # mid gradient accumulation: no optimizer step yet
        step = engine.global_steps
        if step % stage.log_every == 0 or step == stage.max_steps:
            last = {**window.collect(dist), "lr": w.scheduler.get_last_lr()[0]}
            if step % stage.eval_every == 0 or step == stage.max_steps:
                last.update(_reference_accuracy(engine, evaluation, candidates, micro))
            tracker.log(last, step)
        if step % train.checkpoint_every == 0 or step == stage.max_steps:
            report_checkpoint(engine, w.optimizer, step, tracker, last, w.state, w.restored, dist)

    # --- export (every rank gathers under ZeRO-3; rank 0 writes and logs)
    export_trained(engine, cfg, "aligner", config["run_name"], w.rank, tracker)
    tracker.end()


def _reference_accuracy(engine, examples: list[dict], candidates: list, micro: int) -> dict:
    """Every rank scores the same held-out pronoun frames (same module calls on every rank, as
    ZeRO-3 requires); the figures are identical on all ranks. ``conditioning_cosine``: how close
    the predicted conditioning is to the fused target, whatever the referent (the mapper's share)."""
    import torch

    from storygpt.aligner.data import collate
    from storygpt.aligner.metrics import conditioning_cosine, reference_accuracy

    if not examples:
        return {}
    model = engine.module
    was_training = model.training
    model.eval()
    predicted = []
    with torch.no_grad():
        for start in range(0, len(examples), micro):
            batch = {k: v.to(engine.device) for k, v in collate(examples[start:start + micro], model).items()}
            predicted.append(model(batch)["conditioning"].float().cpu())
    model.train(was_training)
    predicted = torch.cat(predicted)
    accuracy, chance = reference_accuracy(predicted, [torch.as_tensor(c) for c in candidates])
    targets = torch.stack([torch.as_tensor(e["target"]) for e in examples])
    return {"reference_accuracy": accuracy, "reference_chance": chance,
            "conditioning_cosine": conditioning_cosine(predicted, targets)}
