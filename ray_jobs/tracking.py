"""MLflow from rank 0: params, metrics, images, the final model.

Metrics are buffered and committed when a checkpoint is reported, so a run that dies and
resumes from its last checkpoint never logs a step twice. The run id travels in the
checkpoint's client state, so a resumed training continues the same MLflow run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from storygpt.config import StoryConfig


def tracking_uri(cfg: StoryConfig) -> str:
    """The preset's URI, else $MLFLOW_TRACKING_URI, else a sqlite file in the work dir."""
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.work_dir).resolve()}/mlflow.db"


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
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, experiment_id=experiment_id)
        self.run_id = run.info.run_id
        if run_id is None:
            params = {k: str(v)[:500] for k, v in cfg.flat().items()}
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                mlflow.log_params(dict(list(params.items())[start : start + 100]))

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

    def artifacts(self, directory: str | Path, path: str) -> None:
        if self.active:
            self.mlflow.log_artifacts(str(directory), artifact_path=path)

    def files(self, paths: list[str | Path], path: str) -> None:
        if self.active:
            for file in paths:
                self.mlflow.log_artifact(str(file), artifact_path=path)

    def register(self, path: str, name: str) -> None:
        """Register a logged artifact dir as a model version (visible in the MLflow registry)."""
        if self.active:
            client = self.mlflow.MlflowClient()
            try:
                client.create_registered_model(name)
            except self.mlflow.exceptions.MlflowException:
                pass  # already registered
            client.create_model_version(name, f"runs:/{self.run_id}/{path}", run_id=self.run_id)

    def end(self) -> None:
        if self.active:
            self.commit()
            self.mlflow.end_run()
