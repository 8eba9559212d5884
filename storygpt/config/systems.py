"""``train:`` and ``mlflow:``: how training runs on the cluster (Ray Train workers, DeepSpeed
ZeRO, checkpoints) and where its metrics go, apart from what it trains."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from storygpt.config.base import Section


class TrainConfig(Section):
    num_workers: int = Field(ge=1)
    cpus_per_worker: float = Field(gt=0, description="leave CPUs for the Ray Data tasks that feed them")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="custom resources per Train worker, e.g. {gpu_8x_worker: 1}: the node type")
    use_gpu: bool
    zero_stage: Literal[2, 3]
    deepspeed_config: str = Field(description="DeepSpeed JSON; '{stage}' is replaced by zero_stage")
    gradient_accumulation_steps: int = Field(ge=1)
    checkpoint_every: int = Field(ge=1)
    max_failures: int = Field(ge=-1)
    checkpoints_to_keep: int = Field(ge=1)
    storage_path: str


class MLflowConfig(Section):
    tracking_uri: str | None = Field(
        default=None, description="null: $MLFLOW_TRACKING_URI, else sqlite in the work dir"
    )
    experiment: str
