"""MLflow from rank 0: params, metrics, images, the final model.

Every run records what made it: the source (git commit when there is one, else
$STORYGPT_GIT_COMMIT, and always a digest of the project's Python sources), the whole resolved
config (``config.yaml``), and system metrics (CPU, memory, disk, network; GPU through
nvidia-ml-py) sampled every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10) on rank 0's node.
Metrics are buffered and committed when a checkpoint is reported, so a run that dies and
resumes from its last checkpoint never logs a step twice. The run id travels in the
checkpoint's client state, so a resumed training continues the same MLflow run. The trained
export is logged as an MLflow model and registered (storygpt/registry.py).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np

import storygpt
from storygpt.config import StoryConfig

SOURCES = ("storygpt", "preprocessing", "ray_jobs", "serving")


def tracking_uri(cfg: StoryConfig) -> str:
    """The preset's URI, else $MLFLOW_TRACKING_URI, else a sqlite file in the work dir."""
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.work_dir).resolve()}/mlflow.db"


def run_params(cfg: StoryConfig) -> dict[str, str]:
    """A run's MLflow params: every config value, and which form of the method its data allows."""
    from storygpt.data.readers import method_variant

    return {**{k: str(v)[:500] for k, v in cfg.flat().items()}, "method_variant": method_variant(cfg.data.format)}


class Tracker:
    def __init__(self, cfg: StoryConfig, run_name: str, run_id: str | None, active: bool):
        self.active, self.pending, self.run_id = active, [], run_id
        self.logged_through: int | None = None  # the last step MLflow holds (runtime.resume_metrics)
        if not active:
            return
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri(cfg))
        experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
        if experiment is None:  # artifacts beside the work dir, not in a worker's cwd
            artifacts = (Path(cfg.work_dir) / "mlartifacts").resolve().as_uri()
            experiment_id = mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, experiment_id=experiment_id,
                               log_system_metrics=True)
        self.run_id, self.cfg = run.info.run_id, cfg
        if run_id is None:
            params = run_params(cfg)
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                mlflow.log_params(dict(list(params.items())[start : start + 100]))
            mlflow.set_tags(source_tags())
            mlflow.log_dict(cfg.model_dump(mode="json"), "config.yaml")  # whole, untruncated

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            self.pending.append((step, metrics))

    def commit(self) -> None:
        """Flush the buffered metrics: call when a checkpoint covering them is reported. Once
        ``logged_through`` is known (runtime.resume_metrics), steps MLflow already holds are
        dropped: a restarted worker re-runs steps its predecessor may have logged."""
        if not self.active:
            return
        if self.logged_through is not None:
            self.pending = [(s, m) for s, m in self.pending if s > self.logged_through]
            if self.pending:
                self.logged_through = max(s for s, _ in self.pending)
        for step, metrics in self.pending:
            self.mlflow.log_metrics(metrics, step=step)
        self.pending = []

    def image(self, image: np.ndarray, path: str) -> None:
        if self.active:
            self.mlflow.log_image(image, path)

    def files(self, paths: list[str | Path], path: str) -> None:
        if self.active:
            for file in paths:
                self.mlflow.log_artifact(str(file), artifact_path=path)

    def log_model(self, export: str | Path, stage: str) -> None:
        """The export as an MLflow pyfunc model, registered as ``<experiment>-<stage>``."""
        if self.active:
            from storygpt.registry import log_model

            log_model(self.mlflow, self.cfg, stage, Path(export))

    def end(self) -> None:
        if self.active:
            self.commit()
            self.mlflow.end_run()


def source_tags() -> dict[str, str]:
    """What code made a run. ``mlflow.source.git.commit`` (the tag MLflow's UI shows) from the
    checkout the code runs from, else from $STORYGPT_GIT_COMMIT (a `--working-dir` upload and the
    image carry no .git: deploy/Dockerfile bakes it in, `--runtime-env-json` can pass it); the
    digest of the Python sources tells runs apart even without git."""
    root = Path(storygpt.__file__).resolve().parents[1]
    tags = {"storygpt.version": storygpt.__version__, "storygpt.source_digest": source_digest(root)}
    commit = os.environ.get("STORYGPT_GIT_COMMIT") or _git(root, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
        if dirty is not None:
            tags["storygpt.git_dirty"] = str(bool(dirty))
    return tags


def source_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for package in SOURCES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _git(root: Path, *args: str) -> str | None:
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
