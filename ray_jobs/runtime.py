"""What both training recipes share on the Ray side: DeepSpeed config, run names, checkpoints.

No model maths here: the recipes call library code for that.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from storygpt.config import ConfigError, StoryConfig

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
    total = 0.0
    for state in optimizer.state_dict().get("state", {}).values():
        for value in state.values():
            if torch.is_tensor(value) and value.is_floating_point():
                total += float(value.double().abs().sum())
    return total
