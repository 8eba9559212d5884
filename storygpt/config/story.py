"""The root schema: :class:`StoryConfig` assembles every section and resolves the paths in them.

The path helpers live on the config itself so that any process holding one (a Ray worker, a
`ray job submit` entrypoint) can resolve paths without the loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storygpt import presets
from storygpt.config.base import ConfigError, Section
from storygpt.config.data import DataConfig
from storygpt.config.evaluate import EvaluateConfig
from storygpt.config.models import ModelPaths, TinyZooConfig
from storygpt.config.serve import ServeConfig
from storygpt.config.stages import AlignerConfig, CharLDMConfig, PrecomputeConfig, PreprocessConfig
from storygpt.config.systems import MLflowConfig, TrainConfig


class StoryConfig(Section):
    """The whole system. ``work_dir`` holds everything a run writes."""

    preset: str
    work_dir: str
    seed: int
    data: DataConfig
    models: ModelPaths
    zoo: TinyZooConfig | None = None
    preprocess: PreprocessConfig
    char_ldm: CharLDMConfig
    precompute: PrecomputeConfig
    aligner: AlignerConfig
    train: TrainConfig
    mlflow: MLflowConfig
    serve: ServeConfig
    evaluate: EvaluateConfig

    def path(self, value: str) -> Path:
        """Resolve a configured path: substitute '{work_dir}', keep it relative to the cwd."""
        return Path(value.replace("{work_dir}", self.work_dir))

    def require_dir(self, dotted: str, hint: str = "") -> Path:
        """Return the directory at ``dotted`` or raise naming the key (a missing weights dir)."""
        value: Any = self
        for part in dotted.split("."):
            value = getattr(value, part)
        path = self.path(value)
        if not path.is_dir():
            hints = [hint] if hint else []
            if dotted.startswith("models.") and self.zoo is not None and self._in_work_dir(path, "zoo"):
                hints.append(f"build the tiny zoo: storygpt zoo {self._command_args()}")
            extra = f" ({'; '.join(hints)})" if hints else ""
            raise ConfigError(f"{dotted}: expected an existing directory, got '{path}'{extra}")
        return path

    def dataset_root(self) -> Path:
        """``data.root``; a story-world preset whose world is not rendered yet says how to render it."""
        root = self.path(self.data.root)
        if self.data.world is not None and not root.is_dir():
            raise ConfigError(f"data.root: no dataset at '{root}' (render the story world: "
                              f"storygpt world {self._command_args()})")
        return root

    def _in_work_dir(self, path: Path, part: str) -> bool:
        return (Path(self.work_dir) / part).resolve() in path.resolve().parents

    def _command_args(self) -> str:
        """``--config PRESET --set work_dir=DIR``: a command that builds what this config reads."""
        return f"--config {self.preset} --set work_dir={self.work_dir}"

    def resolved(self) -> "StoryConfig":
        """The same config with ``{work_dir}`` substituted and every path absolute, for processes
        whose working directory differs (Ray workers, `ray job submit`)."""
        base = Path(self.work_dir).resolve()
        absolute = lambda v: str(Path(v.replace("{work_dir}", str(base))).resolve())  # noqa: E731
        data = self.model_dump()
        data["work_dir"] = str(base)
        data["data"]["root"] = absolute(self.data.root)
        data["models"].update({k: absolute(v) for k, v in self.models.paths().items() if v is not None})
        data["preprocess"]["output"] = absolute(self.preprocess.output)
        data["precompute"]["output"] = absolute(self.precompute.output)
        data["train"]["storage_path"] = absolute(self.train.storage_path)
        data["evaluate"]["output"] = absolute(self.evaluate.output)
        data["evaluate"]["classifier"]["output"] = absolute(self.evaluate.classifier.output)
        data["evaluate"]["captioner"]["model"] = absolute(self.evaluate.captioner.model)
        if self.evaluate.fid_weights:
            data["evaluate"]["fid_weights"] = absolute(self.evaluate.fid_weights)
        if self.evaluate.classifier.weights:
            data["evaluate"]["classifier"]["weights"] = absolute(self.evaluate.classifier.weights)
        data["train"]["deepspeed_config"] = absolute(self.deepspeed_config_path())
        return StoryConfig.model_validate(data)

    def deepspeed_config_path(self) -> str:
        """``train.deepspeed_config`` for this ZeRO stage; a relative ``configs/deepspeed/...`` that
        does not exist from the cwd is the bundled JSON (an installed wheel, a job's working dir)."""
        path = self.train.deepspeed_config.replace("{stage}", str(self.train.zero_stage))
        bundled = None if Path(path).is_file() else presets.bundled(Path(path))
        return str(bundled or path)

    def flat(self) -> dict[str, Any]:
        """Flattened dotted view (MLflow params, manifests)."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
