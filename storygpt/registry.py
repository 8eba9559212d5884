"""Trained parts as MLflow models: logged and registered by the training jobs, loaded with
``mlflow.pyfunc.load_model("models:/...")``, served with ``storygpt serve --model-uri``.

Each experiment (``mlflow.experiment``) gets two registered models:

- ``<experiment>-char-ldm``: a Char-LDM export. ``predict`` takes captions (a ``caption`` column)
  and draws one frame per caption.
- ``<experiment>-aligner``: a *story* model, the aligner export plus a ``models:/`` reference to
  the Char-LDM whose fused embeddings it was trained to produce (the precompute targets say which);
  the two belong together. ``predict`` draws the captions as one story, frame i conditioned on
  every earlier frame and caption.

A version holds the export (``artifacts/export``, with its model card) and the resolved config it
was trained with (``artifacts/config.yaml``). The pretrained base parts (SD-1.5's VAE, the frozen
LM, ...) are read from the paths that config names, never copied: load it where those paths exist
(the cluster's shared volume), or remap them at load time with
``model_config={"overrides": ["models.vae=/elsewhere/vae", ...]}``. The model is "models from
code" (``storygpt/mlflow_pyfunc.py`` is what MLflow runs to load it): no pickle is written.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from mlflow.pyfunc import PythonModel

from storygpt.config import ConfigError, StoryConfig

EXPORT, CONFIG = "export", "config.yaml"
EXPORT_TAG = "storygpt.export"  # on each registered version: the export dir it was logged from
CODE = Path(__file__).with_name("mlflow_pyfunc.py")


def registered_name(cfg: StoryConfig, stage: str) -> str:
    return f"{cfg.mlflow.experiment}-{stage.replace('_', '-')}"


# ----------------------------------------------------------------------------- logging (rank 0)
def log_model(mlflow, cfg: StoryConfig, stage: str, export: Path, register: bool = True):
    """Log ``export`` as a pyfunc model in the active run (and register it); returns its ModelInfo."""
    model_config = {"stage": stage}
    if stage == "aligner":
        model_config["char_ldm_uri"] = _char_ldm_uri(mlflow, cfg)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        config = Path(tmp) / CONFIG  # the resolved config, whole
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        # a signature, no input example: with one MLflow would load and run the model at log time
        warnings.filterwarnings("ignore", message=".*An input example was not provided")  # (it is colour-coded)
        info = mlflow.pyfunc.log_model(
            name=stage, python_model=str(CODE), artifacts={EXPORT: str(export), CONFIG: str(config)},
            model_config=model_config, signature=_signature(cfg), pip_requirements=_requirements(),
            registered_model_name=registered_name(cfg, stage) if register else None, await_registration_for=0)
    if register and info.registered_model_version is not None:
        mlflow.MlflowClient().set_model_version_tag(registered_name(cfg, stage), info.registered_model_version,
                                                    EXPORT_TAG, str(Path(export).resolve()))
    return info


def _char_ldm_uri(mlflow, cfg: StoryConfig) -> str:
    """The Char-LDM this aligner was trained against: its registered version, found by the export
    dir the precompute targets name; one trained elsewhere is logged into this run instead."""
    from storygpt.char_ldm.targets import read_target_info

    char_ldm = str(Path(read_target_info(cfg.precompute.output)["char_ldm"]).resolve())
    name = registered_name(cfg, "char_ldm")
    client = mlflow.MlflowClient()
    versions = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(EXPORT_TAG) == char_ldm]
    if versions:
        return f"models:/{name}/{max(int(v.version) for v in versions)}"
    return log_model(mlflow, cfg, "char_ldm", Path(char_ldm), register=False).model_uri


def _signature(cfg: StoryConfig):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("string", "caption")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),  # frames, (N, H, W, RGB)
        params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("steps", "long", cfg.char_ldm.sample_steps),
                            ParamSpec("guidance", "double", cfg.char_ldm.guidance_scale)]))


def _requirements() -> list[str]:
    """What loading needs, pinned as installed here (given, so MLflow does not infer them by loading)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for dist in ("storygpt-v-ray", "torch", "diffusers", "transformers", "mlflow"):
        try:
            pins.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pins.append(dist)
    return pins


# ----------------------------------------------------------------------------- resolving a version
@dataclass(frozen=True)
class Resolved:
    cfg: StoryConfig
    stage: str
    export: Path  # this model's export dir
    char_ldm: Path  # the Char-LDM export (the same dir for a char_ldm model)
    aligner: Path | None


def resolve(model_uri: str, overrides: list[str] | tuple[str, ...] = ()) -> Resolved:
    """A registry version (``models:/name/3``, ``models:/name@alias``, ``runs:/...``) as local
    export dirs and its training config with ``overrides`` applied. With a file artifact store
    (the default, on shared storage) nothing is copied; a remote one is downloaded."""
    model_config, files = _model_files(model_uri)
    return from_artifacts(files, model_config, overrides)


def _model_files(model_uri: str) -> tuple[dict, dict[str, Path]]:
    """A logged StoryGPT-V model's model_config and its artifacts as local paths."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.pyfunc import MODEL_CONFIG

    try:
        local = Path(download_artifacts(model_uri))
    except MlflowException as err:
        raise ConfigError(f"--model-uri: cannot load '{model_uri}': {err.message}") from None
    flavor = Model.load(str(local)).flavors.get("python_function", {})
    model_config = flavor.get(MODEL_CONFIG) or {}
    if "stage" not in model_config:
        raise ConfigError(f"--model-uri: '{model_uri}' is not a StoryGPT-V model (no stage in its model_config)")
    return model_config, {name: local / entry["path"] for name, entry in flavor.get("artifacts", {}).items()}


def from_artifacts(files: dict[str, Path | str], model_config: dict, overrides=()) -> Resolved:
    """``files``: the model's artifacts by name (``export``, ``config.yaml``), local paths."""
    from storygpt.config import load_config

    cfg = load_config(Path(files[CONFIG]), list(overrides) + list(model_config.get("overrides", [])))
    stage, export = model_config["stage"], Path(files[EXPORT])
    if stage == "char_ldm":
        return Resolved(cfg, stage, export, export, None)
    char_ldm = Path(_model_files(model_config["char_ldm_uri"])[1][EXPORT])
    return Resolved(cfg, stage, export, char_ldm, export)


# ----------------------------------------------------------------------------- the pyfunc
class StoryGPTModel(PythonModel):
    """``predict(DataFrame{caption}, params={seed, steps, guidance})`` -> uint8 frames (N, H, W, 3)."""

    def load_context(self, context) -> None:
        from storygpt.char_ldm.pipeline import CharLDMPipeline
        from storygpt.training import pick_device

        resolved = from_artifacts(context.artifacts, dict(context.model_config or {}))
        self.cfg, self.stage, device = resolved.cfg, resolved.stage, pick_device()
        self.pipeline = CharLDMPipeline.from_config(self.cfg, resolved.char_ldm, device=device)
        self.aligner = None
        if resolved.aligner is not None:
            from storygpt.aligner.model import StoryAligner

            self.aligner = StoryAligner.from_config(self.cfg, resolved.aligner).to(device).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        captions = [str(c) for c in model_input["caption"]]  # the signature makes any input this frame
        if not captions:
            raise ValueError("caption: give at least one caption")
        params = params or {}
        seed = int(params.get("seed", 0))
        steps = int(params.get("steps", self.cfg.char_ldm.sample_steps))
        guidance = float(params.get("guidance", self.cfg.char_ldm.guidance_scale))
        if self.aligner is None:
            return np.stack(self.pipeline(captions=captions, steps=steps, guidance_scale=guidance, seed=seed))
        from storygpt.pipeline import StoryGPTPipeline

        story = StoryGPTPipeline(self.cfg, self.aligner, self.pipeline).stream(captions, seed, steps, guidance)
        return np.stack([frame.image for frame in story])
