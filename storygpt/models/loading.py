"""One loader per pretrained part: the same call reads the tiny zoo and the real weights.

Every loader takes a local directory (never a hub id: ``local_files_only``), checks that it
holds the expected part before handing it to the library, and raises ``FileNotFoundError`` /
``ValueError`` naming the directory and what it expected. ``dtype`` is the weights' dtype;
:func:`frozen_dtype` reads the one a preset keeps its frozen parts in (``models.frozen_dtype``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, LDMSuperResolutionPipeline, UNet2DConditionModel
from safetensors.torch import load_model
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from storygpt.config import StoryConfig
from storygpt.models.sam import CONFIG_FILE, MODEL_TYPE, WEIGHTS_FILE, SamArchitecture, build_sam

LM_FAMILIES = ("opt", "llama")  # what the aligner knows how to extend with [IMG] tokens
OFFICIAL_SAM_CHECKPOINT = re.compile(r"sam_(vit_[bhl])_\w*\.pth")  # e.g. sam_vit_h_4b8939.pth
TOKENIZER_FILE = "tokenizer_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # models.frozen_dtype's values


def frozen_dtype(cfg: StoryConfig) -> torch.dtype:
    """The dtype the preset loads and keeps its frozen parts in (``models.frozen_dtype``)."""
    return DTYPES[cfg.models.frozen_dtype]


def load_clip_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """The CLIP tokenizer of a text-encoder directory: in it, or in the sibling ``tokenizer/``
    of a diffusers Stable Diffusion layout (``.../text_encoder``). Loads no weights."""
    path = _checked(directory, "CLIP text encoder", kinds={"clip_text_model", "clip"})
    tokenizer_dir = path if (path / TOKENIZER_FILE).is_file() else path.parent / "tokenizer"
    _require_file(tokenizer_dir, TOKENIZER_FILE, "CLIP tokenizer", also_tried=path)
    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def load_clip_text(
    directory: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedTokenizerBase, CLIPTextModel]:
    """(tokenizer, CLIPTextModel); the tokenizer as :func:`load_clip_tokenizer` finds it."""
    tokenizer = load_clip_tokenizer(directory)
    return tokenizer, CLIPTextModel.from_pretrained(directory, dtype=dtype, local_files_only=True)


def load_clip_vision(
    directory: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[CLIPImageProcessor, CLIPVisionModelWithProjection]:
    """(CLIPImageProcessor, CLIPVisionModelWithProjection); a full CLIP checkpoint also works."""
    path = _checked(directory, "CLIP vision encoder", kinds={"clip_vision_model", "clip"})
    _require_file(path, "preprocessor_config.json", "CLIP image processor")
    processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    model = CLIPVisionModelWithProjection.from_pretrained(path, dtype=dtype, local_files_only=True)
    return processor, model


def load_vae(directory: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    path = _checked(directory, "VAE", classes={"AutoencoderKL"})
    return AutoencoderKL.from_pretrained(path, dtype=dtype, local_files_only=True)


def load_unet(directory: str | Path, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    path = _checked(directory, "UNet", classes={"UNet2DConditionModel"})
    return UNet2DConditionModel.from_pretrained(path, dtype=dtype, local_files_only=True)


def load_scheduler(directory: str | Path) -> DDPMScheduler:
    """The training noise schedule as DDPM, whatever sampler the directory names (SD-1.5 ships
    PNDM's config). Build samplers from it: ``DDIMScheduler.from_config(s.config)``."""
    path = _checked(directory, "noise scheduler", config_file="scheduler_config.json")
    return DDPMScheduler.from_pretrained(path, local_files_only=True)


def load_lm(
    directory: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, causal LM) for an OPT or Llama-family directory."""
    path = _checked(directory, "language model", kinds=set(LM_FAMILIES))
    _require_file(path, TOKENIZER_FILE, "language-model tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tokenizer, AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)


def load_sam(directory: str | Path, dtype: torch.dtype = torch.float32) -> Sam:
    """SAM from our format (config.json + model.safetensors) or an official checkpoint
    ``sam_vit_{b,l,h}_*.pth``, whose architecture its file name gives."""
    path = _existing_dir(directory, "SAM")
    if (path / CONFIG_FILE).is_file():
        _checked(path, "SAM", kinds={MODEL_TYPE})
        _require_file(path, WEIGHTS_FILE, "SAM weights")
        sam = build_sam(SamArchitecture.read(path))
        load_model(sam, str(path / WEIGHTS_FILE))
        return sam.to(dtype)
    checkpoints = sorted(p for p in path.glob("*.pth") if OFFICIAL_SAM_CHECKPOINT.fullmatch(p.name))
    if len(checkpoints) != 1:
        found = ", ".join(p.name for p in checkpoints) or "none"
        error = FileNotFoundError if not checkpoints else ValueError
        raise error(
            f"SAM: '{path}' must hold either {CONFIG_FILE} + {WEIGHTS_FILE} or exactly one official "
            f"checkpoint sam_vit_{{b,l,h}}_*.pth (found: {found})"
        )
    arch = OFFICIAL_SAM_CHECKPOINT.fullmatch(checkpoints[0].name).group(1)
    sam = sam_model_registry[arch]()
    sam.load_state_dict(torch.load(checkpoints[0], map_location="cpu", weights_only=True))
    return sam.to(dtype)


def load_super_resolution(
    directory: str | Path, dtype: torch.dtype = torch.float32
) -> LDMSuperResolutionPipeline:
    path = _checked(
        directory,
        "super-resolution pipeline",
        classes={"LDMSuperResolutionPipeline"},
        config_file="model_index.json",
    )
    return LDMSuperResolutionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)


# ----------------------------------------------------------------------------- checks
def _checked(
    directory: str | Path,
    what: str,
    kinds: set[str] | None = None,
    classes: set[str] | None = None,
    config_file: str = "config.json",
) -> Path:
    """The directory, after checking its config names a transformers ``model_type`` in
    ``kinds`` or a diffusers ``_class_name`` in ``classes``."""
    path = _existing_dir(directory, what)
    _require_file(path, config_file, what)
    config: dict[str, Any] = json.loads((path / config_file).read_text())
    for key, allowed in (("model_type", kinds), ("_class_name", classes)):
        if allowed is not None and config.get(key) not in allowed:
            raise ValueError(
                f"{what}: '{path}/{config_file}' has {key}={config.get(key)!r}, "
                f"expected one of {sorted(allowed)} (is this the right directory?)"
            )
    return path


def _existing_dir(directory: str | Path, what: str) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what}: no directory '{path}' (build the tiny zoo, or point the config at weights)"
        )
    return path


def _require_file(path: Path, name: str, what: str, also_tried: Path | None = None) -> None:
    if not (path / name).is_file():
        tried = f" (nor in '{also_tried}')" if also_tried is not None else ""
        raise FileNotFoundError(f"{what}: expected '{name}' in '{path}'{tried}")
