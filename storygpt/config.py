"""One typed schema for the whole system, YAML presets, dotted overrides.

A preset is data (``configs/*.yaml``, shipped inside the package too). ``--config`` takes a preset
name (``tiny``) or a path; a relative ``configs/...`` path that does not exist from the cwd is
looked up among the bundled presets, so commands work from any directory (a `ray job submit`
working dir, an installed wheel). A preset may ``extends:`` another preset (a path relative to
itself); mappings merge key by key, everything else replaces. ``--set a.b=value`` overrides
parse ``value`` as YAML. Unknown keys, wrong types and missing required paths raise
:class:`ConfigError` naming the dotted key and what was expected, nanoGPT-configurator style.

The numbers live in the presets, not here: method hyperparameters have no defaults, so a
preset that forgets one fails loudly instead of silently training something else.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from storygpt import presets

DatasetFormat = Literal["flintstones", "storygptv", "pororo"]
Dataset = Literal["world", "flintstones", "pororo"]
# The character table a layout's own release uses (StoryGPT-V's layout is FlintstonesSV's). A
# command given --format without --dataset reads with this table: the story world is also written
# in the FlintstonesSV layout, but only its own preset says `dataset: world`.
DATASET_OF_FORMAT: dict[str, Dataset] = {"flintstones": "flintstones", "storygptv": "flintstones", "pororo": "pororo"}
PART = Literal["clip_text", "clip_vision", "vae", "unet", "scheduler", "lm", "sam", "super_resolution"]


class ConfigError(ValueError):
    """A bad configuration: the message names the dotted key and what was expected."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- data
class WorldConfig(Section):
    """The procedural story world (the embedded default dataset)."""

    stories: int = Field(gt=0)
    seed: int
    image_size: int = Field(ge=64)
    clip_frames: int = Field(ge=1, description="sampled frames stacked per clip .npy")
    val_fraction: float = Field(ge=0, lt=1)
    test_fraction: float = Field(ge=0, lt=1)


class DataConfig(Section):
    format: DatasetFormat
    dataset: Dataset = Field(
        description="character table (names, genders, label order) the corpus uses"
    )
    root: str = Field(description="dataset directory; '{work_dir}' is substituted")
    split: Literal["train", "val", "test"]
    clip_frame: int = Field(ge=0, description="which sampled frame of a clip (.npy / PNG strip)")
    frames_per_story: int = Field(ge=2)
    box_source_size: tuple[int, int] | None = Field(
        default=None, description="(W, H) the annotation boxes are expressed in; null = frame pixels"
    )
    on_error: Literal["raise", "skip"] = Field(
        description="bad input: raise naming file and id, or skip and count it in the report"
    )
    referential_rule: Literal["equal", "subset"] = Field(
        description="which frames get pronouns (storygpt.data.referential): 'equal', the cast equals the "
                    "tracked set (the reference loaders, the paper's numbers); 'subset', Algorithm 1's text")
    world: WorldConfig | None = None


# ----------------------------------------------------------------------------- models
class ModelSource(Section):
    """Where pretrained parts come from and under which licence: every export's model card names them."""

    name: str = Field(description="e.g. stable-diffusion-v1-5")
    license: str = Field(description="the licence the weights are published under")
    url: str | None = None
    parts: list[PART] = Field(min_length=1, description="the models.* parts taken from it")
    note: str | None = Field(default=None, description="what the licence asks of derivatives")


class ModelPaths(Section):
    """Local weight directories, one per pretrained part; '{work_dir}' is substituted."""

    clip_text: str
    clip_vision: str
    vae: str
    unet: str
    scheduler: str
    lm: str
    sam: str
    super_resolution: str
    char_ldm: str | None = Field(default=None, description="trained Char-LDM (train-ldm's export); null: the latest")
    aligner: str | None = Field(default=None, description="trained aligner (train-aligner's export); null: the latest")
    sources: list[ModelSource] = Field(
        default_factory=list, description="provenance and licences of the parts above (the exports' model cards)")


class TinyZooConfig(Section):
    """Sizes of the random tiny models ``storygpt zoo`` builds (tests and quickstart)."""

    tokenizer_vocab_size: int = Field(ge=300)
    clip_hidden_size: int
    clip_layers: int
    clip_heads: int
    clip_projection_dim: int
    vision_image_size: int
    vision_patch_size: int
    vae_block_out_channels: list[int]
    vae_latent_channels: int
    unet_sample_size: int
    unet_block_out_channels: list[int] = Field(min_length=4, max_length=4)
    unet_layers_per_block: int
    unet_attention_head_dim: int
    lm_hidden_size: int
    lm_layers: int
    lm_heads: int
    lm_ffn_dim: int
    lm_max_positions: int
    lm_pretrain_steps: int = Field(ge=0, description="next-token steps on world stories: the frozen LM must know the language")
    vae_pretrain_steps: int = Field(
        ge=0, description="reconstruction steps on rendered world frames: a random VAE cannot decode what the UNet learns")
    scheduler_prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    scheduler_zero_terminal_snr: bool = Field(
        default=False, description="SD-1.5's schedule rescaled to zero SNR at t=T, sampled from t=T "
                                   "(Lin et al. 2024): the last step is pure noise, so only the caption can set the scene")
    sam_image_size: int
    sam_embed_dim: int
    sam_depth: int
    sam_heads: int
    sr_block_out_channels: list[int]
    sr_vq_channels: list[int]


def _ordered(section: Section, low: str, high: str) -> Section:
    """Autoscaling bounds: ``low`` must not exceed ``high`` (a validator's body)."""
    if getattr(section, low) > getattr(section, high):
        raise ValueError(f"{low} ({getattr(section, low)}) must be <= {high} ({getattr(section, high)})")
    return section


# ----------------------------------------------------------------------------- preprocessing
class ActorPoolConfig(Section):
    """An autoscaling Ray Data actor pool."""

    min_actors: int = Field(ge=1)
    max_actors: int = Field(ge=1)
    num_cpus: float = Field(gt=0)
    num_gpus: float = Field(ge=0)
    batch_size: int = Field(ge=1)
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources per actor, e.g. {gpu_1x_worker: 0.5}: the node type")

    @model_validator(mode="after")
    def _min_le_max(self) -> "ActorPoolConfig":
        return _ordered(self, "min_actors", "max_actors")


class SuperResolutionStageConfig(Section):
    backend: Literal["ldm", "resize"] = Field(description="ldm: models.super_resolution; resize: Lanczos")
    steps: int = Field(ge=1, description="denoising steps of the LDM upscaler")
    pool: ActorPoolConfig


class MaskStageConfig(Section):
    backend: Literal["sam", "box"] = Field(description="sam: models.sam prompted with boxes; box: mask = box")
    prefer_dataset_masks: bool = Field(description="use masks the dataset ships (world, StoryGPT-V layout)")
    pool: ActorPoolConfig


class PreprocessConfig(Section):
    """Frames -> records at ``char_ldm.resolution``."""

    splits: list[Literal["train", "val", "test"]] = Field(min_length=1)
    output: str = Field(description="records dir; '{work_dir}' is substituted")
    rows_per_file: int = Field(ge=1, description="frames per Parquet file (the unit of resume)")
    task_num_cpus: float = Field(gt=0, description="CPUs of a load/validate or write task")
    torch_threads: int = Field(ge=1, description="intra-op threads per actor")
    super_resolution: SuperResolutionStageConfig
    masks: MaskStageConfig


# ----------------------------------------------------------------------------- stage 1
class CharLDMConfig(Section):
    resolution: int
    max_characters: int = Field(ge=1)
    trainable_vision_layers: int = Field(ge=0)
    lreg_weight: float = Field(ge=0)
    lreg_blocks: list[str] = Field(min_length=1)
    p_unconditional: float = Field(ge=0, le=1)
    p_text_only: float = Field(ge=0, le=1)
    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(ge=0, description="linear LR warm-up, then constant")
    weight_decay: float = Field(ge=0)
    batch_size: int = Field(gt=0, description="global batch (all workers, before accumulation)")
    max_steps: int = Field(gt=0)
    mixed_precision: Literal["no", "bf16"]
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        description="what the UNet predicts; must be models.scheduler's prediction_type")
    snr_gamma: float | None = Field(gt=0, description="Min-SNR-gamma loss weighting; null: plain MSE (the paper)")
    sample_steps: int = Field(gt=0)
    guidance_scale: float = Field(ge=1)
    sampler: Literal["ddim", "pndm"]
    log_every: int = Field(ge=1, description="steps between metric logs")
    sample_every: int = Field(ge=1, description="steps between sample grids + attention maps")

    @model_validator(mode="after")
    def _schedule_sums_to_at_most_one(self) -> "CharLDMConfig":
        if self.p_unconditional + self.p_text_only > 1:
            raise ValueError("p_unconditional + p_text_only must be <= 1 (the rest is fused)")
        return self


# ----------------------------------------------------------------------------- stage 2
class AlignerConfig(Section):
    lm_family: Literal["opt", "llama"]
    visual_tokens: int = Field(ge=1, description="m: LM-space tokens per frame")
    img_tokens: int = Field(ge=1, description="R: [IMG] tokens")
    mapper_dim: int
    mapper_encoder_layers: int
    mapper_decoder_layers: int
    mapper_heads: int
    mapper_ffn_dim: int
    mapper_queries: int = Field(description="L: learnable queries (77 = CLIP text length)")
    max_length: int = Field(description="longest training sequence (tokens); earliest frames are dropped")
    gen_loss_weight: float = Field(
        default=1.0, ge=0, description="λ in loss = λ·L_gen + L_align (the paper: 1; storygpt/aligner/losses.py)"
    )
    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    batch_size: int = Field(gt=0, description="global batch (all workers, before accumulation)")
    max_steps: int = Field(gt=0)
    mixed_precision: Literal["no", "bf16"]
    log_every: int = Field(ge=1, description="steps between metric logs")
    eval_every: int = Field(ge=1, description="steps between reference-accuracy evals (and at the last step)")
    eval_frames: int = Field(ge=1, description="held-out pronoun frames scored for reference accuracy")
    context_window: int | None = Field(
        default=None, ge=32, description="tokens the story loop keeps in the KV cache; null: the LM's context"
    )
    caption_max_tokens: int = Field(ge=1, description="continuation: the longest caption the LM may write")


class PrecomputeConfig(Section):
    """Stage-2 targets: each frame's fused embedding and CLIP frame feature, beside its record."""

    output: str = Field(description="dir of the fused-embedding table; '{work_dir}' is substituted")
    pool: ActorPoolConfig


# ----------------------------------------------------------------------------- systems
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


# ----------------------------------------------------------------------------- serving
class ReplicaConfig(Section):
    """One Serve deployment: autoscaling bounds and per-replica resources."""

    min_replicas: int = Field(ge=1)
    max_replicas: int = Field(ge=1)
    num_cpus: float = Field(gt=0)
    num_gpus: float = Field(ge=0)
    max_ongoing_requests: int = Field(ge=1)
    target_ongoing_requests: float = Field(gt=0, description="autoscaling target per replica")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources per replica, e.g. {gpu_1x_worker: 1}: the node type")

    @model_validator(mode="after")
    def _min_le_max(self) -> "ReplicaConfig":
        return _ordered(self, "min_replicas", "max_replicas")


class CharLDMReplicaConfig(ReplicaConfig):
    max_batch_size: int = Field(ge=1, description="@serve.batch: frames drawn together across stories")
    batch_wait_timeout_s: float = Field(ge=0)


class ServeLimits(Section):
    """Every request is checked against these; a violation is a 4xx naming the field."""

    max_frames: int = Field(ge=1, description="captions per story (given + continued)")
    max_caption_chars: int = Field(ge=1)
    max_steps: int = Field(ge=1, description="denoising steps a request may ask for")
    max_guidance: float = Field(ge=1)
    max_reference_images: int = Field(ge=0)
    max_image_bytes: int = Field(ge=1, description="one decoded reference image")
    max_image_side: int = Field(ge=1, description="reference image width/height in pixels")


class ServeConfig(Section):
    host: str = Field(description="bind address; 127.0.0.1 unless you mean to expose it")
    port: int = Field(ge=1, le=65535)
    api_key: str | None = Field(default=None, description="required X-API-Key; null: $STORYGPT_API_KEY, else open")
    limits: ServeLimits
    llm: ReplicaConfig
    char_ldm: CharLDMReplicaConfig


class ClassifierConfig(Section):
    """`storygpt train-classifier`: the Inception-v3 that scores frames (Char-/BG-Acc and -F1)."""

    output: str = Field(description="where the fine-tuned classifier is saved and read; '{work_dir}' is substituted")
    weights: str | None = Field(
        default=None, description="ImageNet Inception-v3 state dict to fine-tune (.safetensors, or torchvision's .pth "
                                  "read with weights_only=True); null: random init (tiny)")
    image_size: int = Field(ge=75, description="input side; Inception-v3 needs >= 75 (299 for ImageNet weights)")
    batch_size: int = Field(ge=1)
    max_steps: int = Field(ge=1)
    learning_rate: float = Field(gt=0)


class CaptionerConfig(Section):
    """The BLIP-2 captioner behind BLEU4 / CIDEr: a fine-tuned BLIP-2 the user supplies, or (tiny)
    a small BLIP-2 that `storygpt train-captioner` builds and trains on the story world."""

    model: str = Field(description="BLIP-2 dir (save_pretrained layout); '{work_dir}' is substituted")
    max_new_tokens: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="train-captioner: frames per step")
    max_steps: int = Field(ge=1, description="train-captioner: optimizer steps")
    learning_rate: float = Field(gt=0)


class EvaluateConfig(Section):
    """`storygpt evaluate`: generate the split's stories and score them (paper Table 1)."""

    output: str = Field(description="generated frames, scores and table.md; '{work_dir}' is substituted")
    split: Literal["val", "test"]
    rows: list[Literal["char_ldm/original", "char_ldm/referential", "storygpt/referential", "storygpt/original"]] = Field(
        min_length=1, description="method/captions: Char-LDM alone, or StoryGPT-V (aligner + Char-LDM)")
    max_stories: int | None = Field(default=None, ge=1, description="score the first N stories; null: all")
    story_frames: int | None = Field(default=None, ge=1, description="frames per story; null: data.frames_per_story")
    long_story_frames: list[int] = Field(description="long-story runs: consecutive stories chained to N frames")
    long_stories: int = Field(ge=0, description="long stories per length (0: skip the long-story runs)")
    sample_steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=1)
    detector_tolerance: int = Field(ge=0, le=255, description="story world: the colour detector's L-inf tolerance")
    fid_weights: str | None = Field(
        default=None, description="torch-fidelity's FID Inception weights (pt_inception-2015-12-05); null: the "
                                  "fine-tuned classifier's pooled features (not comparable with published FIDs)")
    pool: ActorPoolConfig
    classifier: ClassifierConfig
    captioner: CaptionerConfig


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
        data["models"] = {k: v if v is None or k == "sources" else absolute(v) for k, v in data["models"].items()}
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


# ----------------------------------------------------------------------------- loading
DEFAULT_PRESET = "tiny"


def find_config(name_or_path: str | Path) -> Path:
    """A preset file from a name (``tiny``, ``cluster-flintstones``) or a path. An existing path
    wins; a relative ``configs/...`` path missing from the cwd is read from the bundled presets."""
    found = presets.find(name_or_path)
    if found is None:
        raise ConfigError(f"--config: no preset file '{name_or_path}' (a path, or one of the bundled presets: "
                          f"{', '.join(presets.names())})")
    return found


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> StoryConfig:
    """The preset ``path`` (a file or a bundled preset's name; None: ``tiny``) with ``--set`` overrides."""
    path = find_config(DEFAULT_PRESET if path is None else path)
    raw = _read_preset(path, seen=())
    for item in overrides:
        _apply_override(raw, item)
    try:
        return StoryConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source=str(path))) from None


def _read_preset(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: '{path}'")
    if path.resolve() in seen:
        raise ConfigError(f"extends: cycle through '{path}'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _read_preset(path.parent / parent, seen + (path.resolve(),))
    return _merge(base, data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {key}: '{where}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check spelling; see storygpt/config.py)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required, missing")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
