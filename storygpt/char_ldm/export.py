"""A Char-LDM export that describes itself, in the diffusers manner: ``storygpt_index.json`` beside
``unet/``, ``fuser/`` and ``vision/`` names every part, the noise schedule it was trained under
(``prediction_type`` included) and a fingerprint of each frozen part it was trained with.

The frozen parts (VAE, text encoder, vision tower, scheduler) come from the preset that loads the
export; loading checks that preset against the index and refuses a mismatch by the config field
to change: a v-prediction export under an ε preset would otherwise sample noise without a word.
Exports written before the index load as before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from storygpt.config import ConfigError, StoryConfig

INDEX = "storygpt_index.json"
FORMAT = 1
# the schedule's fields that change what the UNet learned to predict
SCHEDULE_KEYS = ("prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                 "rescale_betas_zero_snr", "timestep_spacing", "steps_offset")
# bookkeeping, not architecture: left out of the fingerprints
VOLATILE = ("_name_or_path", "_commit_hash", "transformers_version", "_diffusers_version", "torch_dtype", "dtype",
            "architectures", "_use_default_values")


def fingerprint(config: dict) -> str:
    """A short hash of a part's config (its shape and hyper-parameters, not its path)."""
    kept = {k: v for k, v in sorted(config.items()) if k not in VOLATILE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def frozen_parts(model) -> dict[str, dict]:
    """The configs of the parts an export does not carry (a ``CharLDM``'s)."""
    return {"vae": dict(model.vae.config), "clip_text": model.text_encoder.config.to_dict(),
            "clip_vision": model.vision.config.to_dict(), "scheduler": dict(model.noise_scheduler.config)}


def write_index(model, out: Path) -> None:
    schedule = dict(model.noise_scheduler.config)
    index = {
        "format": FORMAT,
        "class": "storygpt.char_ldm.model.CharLDM",
        "parts": {"unet": "diffusers UNet2DConditionModel", "fuser": "CharacterFuser (safetensors)",
                  "vision": "the trained CLIP vision tensors (safetensors)"},
        "schedule": {k: schedule.get(k) for k in SCHEDULE_KEYS},
        "char_ldm": {"prediction_type": model.config.prediction_type, "resolution": model.config.resolution,
                     "trainable_vision_layers": model.config.trainable_vision_layers},
        "frozen": {part: fingerprint(config) for part, config in frozen_parts(model).items()},
    }
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def check_index(trained: Path, cfg: StoryConfig, scheduler_config: dict | None, frozen: dict[str, dict]) -> None:
    """Refuse ``cfg`` for the export at ``trained`` when it disagrees with the export's index,
    naming the field; ``frozen``: the configs of the parts ``cfg`` loaded (a caller that loads
    no scheduler, or only some parts, checks what it loaded)."""
    path = trained / INDEX
    if not path.is_file():
        return  # an export from before the index: nothing to check against
    index = json.loads(path.read_text())
    where = f"the export '{trained}' ({INDEX})"
    for key, trained_value in (index["schedule"] if scheduler_config is not None else {}).items():
        if scheduler_config.get(key) != trained_value:
            raise ConfigError(f"models.scheduler: {where} was trained with {key}={trained_value!r}; "
                              f"'{cfg.models.scheduler}' has {scheduler_config.get(key)!r}")
    for key, trained_value in index["char_ldm"].items():
        if getattr(cfg.char_ldm, key) != trained_value:
            raise ConfigError(f"char_ldm.{key}: {where} was trained with {trained_value!r}, the preset has "
                              f"{getattr(cfg.char_ldm, key)!r}")
    for part, trained_print in index["frozen"].items():
        if part in frozen and fingerprint(frozen[part]) != trained_print:
            raise ConfigError(f"models.{part}: {where} was trained with another {part} (its config differs from "
                              f"'{getattr(cfg.models, part)}'); point models.{part} at the one it was trained with")
