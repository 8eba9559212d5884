"""What a run writes under ``work_dir``, in one place.

    {work_dir}/world/             the procedural story world (``data.root`` of the tiny presets)
              zoo/                the tiny pretrained parts (``storygpt zoo``)
              records/            preprocessed Parquet parts (``preprocess.output``)
              char_ldm/<run>/     a Char-LDM export (``storygpt train-ldm``)
              fused/<run>/        stage-2 targets computed with the Char-LDM export of the same run name
              aligner/<run>/      an aligner export (``storygpt train-aligner``)
              evaluation/<time>/  frames, scores.json, table.md (``evaluate.output``)
              story/              the demo's story drawn over HTTP
              mlflow.db, ray_results/, demo.log, dataset_summary.json

Paths a config sets (``preprocess.output``, ``precompute.output``, ``models.*``) win over these
defaults; the jobs read them from the config, and this module names the rest. Run names sort by
time, so the last export of a stage is the newest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Stage = Literal["char_ldm", "aligner"]


@dataclass(frozen=True)
class WorkDir:
    root: Path

    @classmethod
    def of(cls, cfg) -> WorkDir:
        """The work dir of a ``StoryConfig``, as it names it (``cfg.resolved()``: absolute, for Ray workers)."""
        return cls(Path(cfg.work_dir))

    @property
    def zoo(self) -> Path:
        return self.root / "zoo"

    @property
    def story(self) -> Path:
        return self.root / "story"

    @property
    def demo_log(self) -> Path:
        return self.root / "demo.log"

    @property
    def dataset_summary(self) -> Path:
        return self.root / "dataset_summary.json"

    def exports(self, stage: Stage) -> Path:
        """Where ``stage``'s runs export their trained parts."""
        return self.root / stage

    def export(self, stage: Stage, run: str) -> Path:
        return self.exports(stage) / run

    def latest_export(self, stage: Stage) -> Path | None:
        """The newest export of ``stage``, or None where there is none."""
        runs = sorted(p for p in self.exports(stage).glob("*") if p.is_dir() and not p.name.startswith("."))
        return runs[-1] if runs else None

    def targets(self, char_ldm_run: str) -> Path:
        """Stage-2 targets of one Char-LDM run: a new Char-LDM needs new targets, and precompute
        refuses to mix two models' targets in one dir."""
        return self.root / "fused" / char_ldm_run
