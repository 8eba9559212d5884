"""StoryGPT-V inference in one place: the aligner's story loop (:mod:`storygpt.aligner.generation`)
conditioning a Char-LDM (:mod:`storygpt.char_ldm.pipeline`).

Every caller draws stories through :class:`StoryGPTPipeline` — ``storygpt generate``, the
evaluation, the MLflow story model, Serve and the benchmarks — so the reference-image policy and
delayed conditioning mean the same everywhere. Serve keeps its Char-LDM in another deployment and
passes a remote ``draw``; everyone else draws with the local Char-LDM.

The reference-image policy: a caption that *names* a character the request has a reference
image of is drawn from the Char-LDM's own fused conditioning of that caption (what the aligner
was trained to imitate, with the user's look of the character); every other frame, pronouns
included, from the aligner's conditioning. ``first_frame_references`` apply the same policy to
frame 1 alone: the official evaluation draws frame 1, which has nothing earlier to resolve, with
the Char-LDM and its reference images, and the LM only from frame 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from storygpt.aligner.generation import GeneratedFrame, StoryGenerator
from storygpt.aligner.model import StoryAligner
from storygpt.char_ldm.pipeline import CharLDMPipeline
from storygpt.config import StoryConfig
from storygpt.data.characters import CharacterTable, get_table

Draw = Callable[[torch.Tensor, int, str], np.ndarray]


def referenced(caption: str, references: dict, table: CharacterTable) -> list[str]:
    """Characters ``caption`` names that have a reference image (caption order, no repeats)."""
    if not references:
        return []
    names: list[str] = []
    for match in table.mention_pattern.finditer(caption):
        character = table.get(match.group(0))
        if character is not None and character.name in references and character.name not in names:
            names.append(character.name)
    return names


class StoryGPTPipeline:
    def __init__(self, cfg: StoryConfig, aligner: StoryAligner, char_ldm: CharLDMPipeline | None = None,
                 draw: Draw | None = None):
        """``char_ldm``: the local Char-LDM; or ``draw(conditioning, seed, caption)``, a frame from
        elsewhere (Serve's deployment), which then owns the reference policy."""
        if (char_ldm is None) == (draw is None):
            raise ValueError("give a local char_ldm or a draw function, not both")
        self.cfg, self.aligner, self.char_ldm, self._draw = cfg, aligner, char_ldm, draw
        self.table = get_table(cfg.data.dataset)

    @classmethod
    def from_pretrained(cls, cfg: StoryConfig, char_ldm_dir: str | Path, aligner_dir: str | Path,
                        device: str | torch.device = "cpu") -> StoryGPTPipeline:
        char_ldm = CharLDMPipeline.from_config(cfg, char_ldm_dir, device=device)
        aligner = StoryAligner.from_config(cfg, aligner_dir).to(device).eval()
        return cls(cfg, aligner, char_ldm)

    def generator(self, steps: int | None = None, guidance: float | None = None,
                  references: dict[str, np.ndarray] | None = None,
                  first_frame_references: dict[str, np.ndarray] | None = None,
                  use_cache: bool = True) -> StoryGenerator:
        """A story loop whose frames are drawn with these settings (one per story: it holds the
        story's KV cache; ``use_cache`` off recomputes the whole context per frame, as the
        official code does)."""
        draw = self._drawer(steps, guidance, references or {})
        first = self._drawer(steps, guidance, {**first_frame_references, **(references or {})}) \
            if first_frame_references else None
        return StoryGenerator(self.aligner, draw, self.cfg.aligner.context_window, use_cache, draw_first=first)

    def stream(self, captions: list[str], seed: int = 0, steps: int | None = None, guidance: float | None = None,
               references: dict[str, np.ndarray] | None = None,
               first_frame_references: dict[str, np.ndarray] | None = None) -> Iterator[GeneratedFrame]:
        """One frame per caption, each as soon as it is drawn (frame i with seed ``seed + i``)."""
        return self.generator(steps, guidance, references, first_frame_references).stream(captions, seed=seed)

    def continue_story(self, captions: list[str], k: int, seed: int = 0, steps: int | None = None,
                       guidance: float | None = None,
                       references: dict[str, np.ndarray] | None = None) -> Iterator[GeneratedFrame]:
        """The captions' frames, then ``k`` frames whose captions the LM writes."""
        return self.generator(steps, guidance, references).continue_story(captions, k, seed=seed)

    def _drawer(self, steps: int | None, guidance: float | None, references: dict[str, np.ndarray]) -> Draw:
        if self._draw is not None:
            if references:
                raise ValueError("a remote draw applies its own reference policy: pass no references here")
            return self._draw
        pipeline = self.char_ldm

        def draw(conditioning: torch.Tensor, seed: int, caption: str) -> np.ndarray:
            named = referenced(caption, references, self.table)
            if named:  # the Char-LDM's own fused conditioning, with the given looks
                conditioning = pipeline.encode([caption], [named], {n: references[n] for n in named})
            return pipeline(conditioning=conditioning.to(pipeline.model.device), steps=steps,
                            guidance_scale=guidance, seed=seed, plain_captions=[caption])[0]

        return draw
