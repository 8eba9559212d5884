"""Images for the training log: samples under their ground truth, and where each character's
token attends (the paper's Fig. 5). The characters are fused from their crops in the batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from storygpt.char_ldm.model import CharLDM
from storygpt.char_ldm.pipeline import CharLDMPipeline
from storygpt.char_ldm.references import reference_crops
from storygpt.config import StoryConfig
from storygpt.data.record_schema import decode_png

MAX_FRAMES = 4  # frames per sample grid


def sample_grid(model: CharLDM, rows: list[dict], cfg: StoryConfig, seed: int = 0) -> np.ndarray:
    """Top: the records' frames; bottom: samples from their captions. (2R, n·R, 3) uint8."""
    rows = rows[:MAX_FRAMES]
    with _inference(model):
        samples = CharLDMPipeline(model, cfg)([r["caption"] for r in rows], [r["characters"] for r in rows],
                                               reference_crops(rows, seed), seed=seed)
    real = [decode_png(r["image"]) for r in rows]
    return np.concatenate([np.concatenate(real, axis=1), np.concatenate(samples, axis=1)], axis=0)


def attention_figure(model: CharLDM, rows: list[dict], cfg: StoryConfig, seed: int = 0) -> np.ndarray:
    """The first record naming a character: its sample, then one heat map per named character."""
    row = next((r for r in rows if any(s is not None for s in r["token_spans"])), rows[0])
    with _inference(model):
        frame, maps = CharLDMPipeline(model, cfg).attention_maps(
            row["caption"], row["characters"], reference_crops([row], seed), seed=seed)
    return np.concatenate([frame, *maps.values()], axis=1)


@contextmanager
def _inference(model: CharLDM) -> Iterator[None]:
    """Eval mode for the sampling, then back to whatever the training loop had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
