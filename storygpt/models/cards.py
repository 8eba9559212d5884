"""Model cards: the README.md written into every trained export (and so into its MLflow model).

An export is a derivative of the pretrained parts it was trained on (the Char-LDM's UNet of
SD-1.5's, the aligner's new parts on a frozen OPT), so it carries their licences, not only this
project's Apache-2.0: SD-1.5's CreativeML OpenRAIL-M asks that its use restrictions pass on to
every derivative, OPT's licence is non-commercial. The card names each base model, its licence
and what that asks (``models.sources`` in the preset), the training data and the config, in the
Hugging Face card layout (YAML front matter, then Markdown).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from storygpt.config import StoryConfig

CARD = "README.md"
# The pretrained parts each export is trained on or needs to load (the aligner reads the CLIP
# text encoder's config for its output width and runs the CLIP vision tower on frames).
PARTS = {
    "char_ldm": ("clip_text", "clip_vision", "vae", "unet", "scheduler"),
    "aligner": ("lm", "clip_vision", "clip_text"),
}
WHAT = {
    "char_ldm": "the trained parts of a StoryGPT-V Char-LDM (stage 1): the fine-tuned UNet, the fuser "
                "and the trainable CLIP vision layers",
    "aligner": "the trained parts of a StoryGPT-V aligner (stage 2): the visual-token projection, the "
               "[IMG] tokens and the mapper, on a frozen LM (not included)",
}
TRAINED_BY = {"char_ldm": "storygpt train-ldm", "aligner": "storygpt train-aligner"}


def write_model_card(cfg: StoryConfig, stage: str, directory: str | Path, run: str) -> Path:
    """Write ``directory/README.md`` for the ``stage`` export of ``run``."""
    sources = [s for s in cfg.models.sources if set(s.parts) & set(PARTS[stage])]
    licences = sorted({s.license for s in sources})
    meta = {
        "license": _licence_id(licences[0]) if len(licences) == 1 else "other",
        "base_model": [s.name for s in sources],
        "tags": ["storygpt-v", "story-visualization", "text-to-image", stage.replace("_", "-")],
        "datasets": [cfg.data.dataset],
    }
    rows = [f"| {', '.join(p for p in s.parts if p in PARTS[stage])} | {_link(s.name, s.url)} | {s.license} "
            f"| {s.note or ''} |" for s in sources]
    missing = sorted(set(PARTS[stage]) - {p for s in sources for p in s.parts})
    stage_cfg = cfg.char_ldm if stage == "char_ldm" else cfg.aligner
    text = "\n".join([
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# StoryGPT-V {stage.replace('_', '-')}: `{run}`", "",
        f"This directory holds {WHAT[stage]}. It was written by `{TRAINED_BY[stage]}` (preset "
        f"`{cfg.preset}`, {stage_cfg.max_steps} steps, batch {stage_cfg.batch_size}, learning rate "
        f"{stage_cfg.learning_rate}). Loading it needs the base models below at the paths the preset's "
        "`models.*` name; they are not copied here.", "",
        "## Base models and their licences", "",
        "| parts (`models.*`) | base model | licence | what it asks |", "|---|---|---|---|", *rows,
        *([f"", f"Not declared in the preset (`models.sources`): {', '.join(missing)}. Check their licences "
           "before sharing this export."] if missing else []), "",
        "These weights are derived from the models above and are distributed under **their** licences "
        "(all of them apply); the StoryGPT-V on Ray code that trained them is Apache-2.0.", "",
        "## Training data", "",
        f"`{cfg.data.dataset}` in the `{cfg.data.format}` layout, read from `{cfg.data.root}`.", "",
        "## Loading", "",
        "```python",
        "from storygpt.config import load_config",
        *(["from storygpt.char_ldm.pipeline import CharLDMPipeline",
            f"pipeline = CharLDMPipeline.from_config(load_config('{cfg.preset}'), '<this directory>')"]
          if stage == "char_ldm" else
          ["from storygpt.aligner.model import StoryAligner",
           f"aligner = StoryAligner.from_config(load_config('{cfg.preset}'), '<this directory>')"]),
        "```", "",
        "Or, from the MLflow registry, `mlflow.pyfunc.load_model('models:/<experiment>-"
        f"{stage.replace('_', '-')}/<version>')` (docs/operations.md).", "",
    ])
    path = Path(directory) / CARD
    path.write_text(text)
    return path


def _licence_id(licence: str) -> str:
    """A Hugging Face licence id from a name: 'Apache-2.0' -> 'apache-2.0', 'CreativeML OpenRAIL-M'
    -> 'creativeml-openrail-m'."""
    return "-".join(licence.lower().split())


def _link(name: str, url: str | None) -> str:
    return f"[{name}]({url})" if url else name
