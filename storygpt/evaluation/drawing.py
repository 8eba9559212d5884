"""Drawing an evaluation story the way each Table-1 row means it.

- ``char_ldm/<captions>``: the Char-LDM alone, frame by frame. It fuses the characters the
  caption names with a reference crop of each (from the train split, as in training), so a
  pronoun leaves it nothing to fuse: the failure StoryGPT-V addresses.
- ``storygpt/<captions>``: the aligner's story loop (the LM sees every earlier generated frame
  and caption) conditioning the same Char-LDM. With ``evaluate.first_frame: char_ldm`` (the
  official evaluation) frame 1 is the Char-LDM's, fused with the same reference crops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from storygpt.config import StoryConfig

METHODS = ("char_ldm", "storygpt")
CAPTIONS = {"original": "caption", "referential": "referential_caption"}


def parse_row(row: str) -> tuple[str, str]:
    """'storygpt/referential' -> ('storygpt', 'referential_caption')."""
    method, captions = row.split("/")
    return method, CAPTIONS[captions]


class StoryDrawer:
    """Build once per worker (loads the Char-LDM, and the aligner when a row needs it); draw many."""

    def __init__(self, cfg: StoryConfig, char_ldm_dir: str | Path, aligner_dir: str | Path | None,
                 references: dict[str, np.ndarray], device: str = "cpu"):
        from storygpt.char_ldm.pipeline import CharLDMPipeline

        self.cfg, self.references = cfg, references
        self.steps, self.guidance = cfg.evaluate.sample_steps, cfg.evaluate.guidance_scale
        self.pipeline = CharLDMPipeline.from_config(cfg, char_ldm_dir, device=device)
        self.story = None
        if aligner_dir is not None:
            from storygpt.aligner.model import StoryAligner
            from storygpt.pipeline import StoryGPTPipeline

            aligner = StoryAligner.from_config(cfg, aligner_dir).to(device).eval()
            self.story = StoryGPTPipeline(cfg, aligner, self.pipeline)

    def draw(self, row: str, frames: list[dict], seed: int) -> list[np.ndarray]:
        """One image per frame of the story (frame k with seed ``seed + k``)."""
        method, field = parse_row(row)
        captions = [f[field] for f in frames]
        if method == "storygpt":
            if self.story is None:
                raise ValueError(f"row {row!r} needs the trained aligner")
            # no reference images after frame 1: every later frame is the LM's
            first = self.references if self.cfg.evaluate.first_frame == "char_ldm" else None
            return [frame.image for frame in self.story.stream(captions, seed, self.steps, self.guidance,
                                                               first_frame_references=first)]
        names = sorted(self.references)  # fuse whichever of them a caption names
        return [self.pipeline([c], [names], self.references, steps=self.steps, guidance_scale=self.guidance,
                              seed=seed + k)[0] for k, c in enumerate(captions)]

