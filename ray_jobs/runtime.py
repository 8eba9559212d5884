"""What both training recipes share on the Ray side: DeepSpeed config, run names, checkpoints.

No model maths here: the recipes call library code for that.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch

from storygpt.atomic import replace_dir
from storygpt.config import ConfigError, StoryConfig
from storygpt.layout import Stage, WorkDir

CLIENT_STATE = "client_state.json"


def deepspeed_config(cfg: StoryConfig, batch_size: int, world_size: int, use_gpu: bool, bf16: bool) -> dict:
    """The preset's DeepSpeed JSON with its "auto" fields filled from the stage's config."""
    ds = json.loads(Path(cfg.train.deepspeed_config).read_text())
    accum = cfg.train.gradient_accumulation_steps
    micro, rest = divmod(batch_size, world_size * accum)
    if micro == 0 or rest:
        raise ConfigError(f"batch_size: {batch_size} must be a multiple of train.num_workers ({world_size}) "
                          f"x train.gradient_accumulation_steps ({accum})")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = batch_size
    ds["zero_optimization"]["stage"] = cfg.train.zero_stage
    ds["bf16"] = {"enabled": bool(bf16 and use_gpu)}  # fp32 on CPU; never fp16 there
    return ds


def connect_ray() -> None:
    """Join the cluster ``ray job submit`` names (RAY_ADDRESS), else start a local instance; a
    no-op where the caller (the demo, a test) already started one."""
    import ray

    if not ray.is_initialized():
        ray.init()


def run_name(storage: Path, prefix: str, resume: bool | str) -> str:
    """A new timestamped run, or (``--resume``) the latest one under ``storage``, or a named one."""
    if isinstance(resume, str):
        return resume
    if resume:
        runs = sorted(p.name for p in storage.glob(f"{prefix}-*") if p.is_dir())
        if not runs:
            raise ConfigError(f"--resume: no '{prefix}-*' run under train.storage_path '{storage}'")
        return runs[-1]
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


@contextlib.contextmanager
def full_parameters(module: torch.nn.Module, zero_stage: int):
    """Inside, every rank sees the full parameters (ZeRO-3 partitions them). All ranks must enter."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def save_checkpoint(engine, step: int, client_state: dict) -> "object":
    """Every rank writes its shard into a temp dir; returns a ray Checkpoint of it."""
    from ray.train import Checkpoint

    local = Path(tempfile.mkdtemp(prefix=f"ckpt-{step}-"))
    engine.save_checkpoint(str(local), tag="state", client_state={"global_step": step, **client_state})
    if engine.global_rank == 0:
        (local / CLIENT_STATE).write_text(json.dumps({"global_step": step, **client_state}))
    return Checkpoint.from_directory(str(local))


def load_checkpoint(engine) -> dict:
    """Resume from ``ray.train.get_checkpoint()``: returns its client state ({} for a fresh run)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as directory:
        _, client_state = engine.load_checkpoint(directory, tag="state")
    return client_state or {}


def optimizer_digest(optimizer) -> float:
    """A cheap fingerprint of this rank's optimizer state, to prove a resume restored it."""
    base = getattr(optimizer, "optimizer", optimizer)  # a DeepSpeed ZeRO optimizer wraps the torch one
    total = 0.0
    for state in base.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.is_floating_point():
                total += float(value.double().abs().sum())
    return total


def verify_restored(engine, optimizer, state: dict, rank: int) -> dict:
    """Prove a resume restored what the checkpoint saved: the exact global step and this rank's
    optimizer state (by digest). Returns the figures for the run's report."""
    step, saved = engine.global_steps, state["optimizer_digests"][rank]
    if step != state["global_step"]:
        raise RuntimeError(f"rank {rank}: resumed at step {step}, the checkpoint was taken at {state['global_step']}")
    digest = optimizer_digest(optimizer)
    if saved <= 0 or abs(digest - saved) > 1e-6 * saved:
        raise RuntimeError(f"rank {rank}: optimizer state digest {digest} differs from the checkpoint's {saved}")
    return {"restored_optimizer_digest": digest, "saved_optimizer_digest": saved}


class MetricWindow:
    """Means of a step's outputs since the last log, over all ranks.

    Each key is summed over the steps that measured it: a NaN (e.g. the attention-in-mask ratio
    of a step with no supervised character) is skipped, not averaged in. Counters (``add``,
    e.g. samples or tokens) become per-second rates.
    """

    def __init__(self, keys: tuple[str, ...], counters: tuple[str, ...] = ()):
        self.keys, self.counters = keys, counters
        self.reset()

    def reset(self) -> None:
        self.sums = {k: [0.0, 0] for k in self.keys}
        self.counts = {k: 0.0 for k in self.counters}
        self.started = time.perf_counter()

    def update(self, out: dict, **counts: float) -> None:
        for key in self.keys:
            value = float(out[key])
            if not math.isnan(value):
                self.sums[key][0] += value
                self.sums[key][1] += 1
        for key, value in counts.items():
            self.counts[key] += value

    def collect(self, dist) -> dict[str, float]:
        """All-reduce (every rank must call), then reset."""
        rows = [self.sums[k] for k in self.keys] + [[self.counts[k], 0] for k in self.counters]
        totals = torch.tensor(rows, dtype=torch.float64)
        dist.all_reduce(totals)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics = {k: (s / n if n else float("nan")) for k, (s, n) in zip(self.keys, totals.tolist())}
        metrics.update({f"{k}_per_s": totals[len(self.keys) + i, 0].item() / elapsed for i, k in enumerate(self.counters)})
        self.reset()
        return metrics


SHUFFLE_BUFFER_ROWS = 256  # rows each worker mixes before cutting micro batches


def micro_batches(shard, micro: int, field: str, seed: int):
    """This worker's shard as micro batches, epoch after epoch (``drop_last``: every rank takes the
    same number of steps), shuffled through a local buffer with a new seed each epoch: rows come
    in story order (a story's frames, or its prefixes for stage 2, side by side), and unshuffled
    micro batches held one story each, in the same order every epoch. A shard smaller than one
    micro batch yields nothing, and the training loop would wait forever: that is refused,
    naming the config field that sets the batch."""
    epoch = 0
    while True:
        empty = True
        for rows in shard.iter_batches(batch_size=micro, batch_format="pyarrow", drop_last=True,
                                       local_shuffle_buffer_size=max(SHUFFLE_BUFFER_ROWS, micro),
                                       local_shuffle_seed=seed + epoch):
            empty = False
            yield rows
        epoch += 1
        if empty:
            raise ConfigError(f"{field}: expected a batch the train split can fill: each worker needs {micro} "
                              f"rows per micro batch and its shard of the train split has fewer")


def start_engine(cfg: StoryConfig, model: torch.nn.Module, stage, world_size: int, rank: int):
    """A DeepSpeed engine over ``model.trainable_parameters()`` with AdamW and the learning-rate schedule of
    ``stage`` (``cfg.char_ldm`` or ``cfg.aligner``), resumed from Ray Train's checkpoint if any.
    Returns (engine, optimizer, scheduler, client_state, restored_figures)."""
    import deepspeed

    from storygpt.training import stage_lr_lambda

    ds_config = deepspeed_config(cfg, stage.batch_size, world_size, cfg.train.use_gpu, stage.mixed_precision == "bf16")
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=stage.learning_rate, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, stage_lr_lambda(stage))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
    state = load_checkpoint(engine)
    restored = verify_restored(engine, optimizer, state, rank) if state else {}
    return engine, optimizer, scheduler, state, restored


@dataclass
class Worker:
    """One Ray Train worker's share of a stage: the config, its model inside a DeepSpeed engine
    resumed from the last checkpoint, the MLflow tracker (only rank 0 logs) and its shard of the
    train split as micro batches."""
    cfg: StoryConfig
    stage: Any        # cfg.char_ldm or cfg.aligner
    rank: int
    model: torch.nn.Module
    engine: Any
    optimizer: Any
    scheduler: Any
    state: dict       # the checkpoint's client state ({} on a fresh run)
    restored: dict    # what resuming verified (verify_restored)
    tracker: Any
    micro: int        # rows per micro batch on this worker
    batches: Iterator


def start_worker(config: dict, stage: Stage, build_model: Callable[[StoryConfig], torch.nn.Module]) -> Worker:
    """Both recipes' worker setup, from the ``train_loop_config`` that :func:`fit_trainer` passes."""
    import ray.train

    from ray_jobs.tracking import Tracker

    cfg = StoryConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    engine, optimizer, scheduler, state, restored = start_engine(cfg, model, getattr(cfg, stage), world, rank)
    tracker = Tracker(cfg, config["run_name"], state.get("mlflow_run_id"), active=rank == 0)
    resume_metrics(tracker, state)  # a restart: each step in MLflow once (see resume_metrics)
    micro = engine.train_micro_batch_size_per_gpu()
    batches = micro_batches(ray.train.get_dataset_shard("train"), micro, f"{stage}.batch_size", cfg.seed + 1000 * rank)
    return Worker(cfg, getattr(cfg, stage), rank, model, engine, optimizer, scheduler, state, restored, tracker,
                  micro, batches)


def report_checkpoint(engine, optimizer, step: int, tracker, metrics: dict, state: dict, restored: dict, dist) -> None:
    """Every rank saves its shard and reports it to Ray Train (a barrier); then the buffered
    metrics it covers are committed to MLflow. The checkpoint carries those metrics too, and
    :func:`resume_metrics` reconciles them with MLflow on a restart, so a step is logged once
    wherever a worker dies (before or after Ray Train registered the checkpoint)."""
    import ray.train

    resume_metrics(tracker, state)
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, optimizer_digest(optimizer))
    covered = [[s, m] for s, m in tracker.pending]  # rank 0's metrics since the last checkpoint
    checkpoint = save_checkpoint(engine, step, {"mlflow_run_id": tracker.run_id, "optimizer_digests": digests,
                                                "metrics": covered})
    report = {**metrics, "global_step": step, "resumed_from_step": state.get("global_step", 0), **restored}
    ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:07d}")
    tracker.commit()


def resume_metrics(tracker, state: dict) -> None:
    """Once per attempt, on rank 0 of a resumed run: make MLflow hold each step once.

    Ray Train registers a checkpoint only once every rank's report reached the controller, a
    moment rank 0 does not wait for, so a worker can die on either side of it:
    after rank 0 committed a checkpoint's metrics but before the checkpoint was registered (the
    restart re-runs those steps: they must not be logged again), or after it was registered
    but before rank 0 committed (they must be logged now: the checkpoint carries them).
    """
    if not tracker.active or tracker.logged_through is not None:
        return
    tracker.logged_through = _last_logged_step(tracker) if state else 0
    new, tracker.pending = tracker.pending, [(int(s), m) for s, m in state.get("metrics", [])]
    tracker.commit()  # what the checkpoint covers and MLflow lacks
    tracker.pending = new  # this attempt's: committed with the next checkpoint, as always


def _last_logged_step(tracker) -> int:
    client = tracker.mlflow.MlflowClient()
    keys = client.get_run(tracker.run_id).data.metrics
    return max((m.step for key in keys for m in client.get_metric_history(tracker.run_id, key)), default=0)


class TrainSummary(TypedDict, total=False):
    """What a training job returns (and prints as JSON): the next step reads ``export``."""
    run: str
    export: str        # the trained parts: WorkDir.export(stage, run)
    checkpoint: str | None
    global_step: int
    loss: float        # and every other metric the last report carried


def fit_trainer(cfg: StoryConfig, stage: Stage, train_loop, loop_config: dict, name: str,
                datasets: dict) -> TrainSummary:
    """Both recipes' driver: a TorchTrainer over ``train.*`` (workers, resources, failures,
    checkpoints kept) fit to the end, its trained parts exported by ``export_trained``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "run_name": name, **loop_config},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                                     **cfg.train.resources_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=cfg.train.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    return TrainSummary(run=name, export=str(WorkDir.of(cfg).export(stage, name)),
                        checkpoint=result.checkpoint.path if result.checkpoint else None, **(result.metrics or {}))


def export_trained(engine, cfg: StoryConfig, stage: str, run: str, rank: int, tracker) -> None:
    """``{work_dir}/<stage>/<run>``: the trained parts (``save_trained``) and their model card,
    logged as an MLflow model and registered as ``<experiment>-<stage>``. Every rank gathers
    under ZeRO-3; rank 0 writes and logs."""
    from storygpt.models.cards import write_model_card

    def write(directory: Path) -> None:
        engine.module.save_trained(directory)
        write_model_card(cfg, stage, directory, run)

    export = WorkDir.of(cfg).export(stage, run)
    with full_parameters(engine.module, cfg.train.zero_stage):
        if rank == 0:
            replace_dir(export, write)  # never a half-written latest export
            tracker.log_model(export, stage)
