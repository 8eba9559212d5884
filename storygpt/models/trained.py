"""Where the trained stages live: ``models.char_ldm`` / ``models.aligner``, else the latest export.

``train-ldm`` exports to ``{work_dir}/char_ldm/<run>`` and ``train-aligner`` to
``{work_dir}/aligner/<run>``; run names sort by time, so the last one is the newest.
"""

from __future__ import annotations

from pathlib import Path

from storygpt.config import ConfigError, StoryConfig
from storygpt.layout import Stage, WorkDir

TRAINED_BY = {"char_ldm": "storygpt train-ldm", "aligner": "storygpt train-aligner"}


def trained_dir(cfg: StoryConfig, stage: Stage, given: str | Path | None = None) -> Path:
    """``given``, else ``models.<stage>``, else the newest export under ``{work_dir}/<stage>/``."""
    key = f"models.{stage}"
    chosen = given or getattr(cfg.models, stage)
    if chosen:
        path = cfg.path(str(chosen))
        if not path.is_dir():
            raise ConfigError(f"{key}: expected a trained {stage} directory, got '{path}'")
        return path
    work = WorkDir.of(cfg)
    latest = work.latest_export(stage)
    if latest is None:
        raise ConfigError(f"{key}: not set and no export under '{work.exports(stage)}' "
                          f"(run `{TRAINED_BY[stage]}` first, or set {key}=DIR)")
    return latest
