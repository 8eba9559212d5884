"""FID and caption scores from maintained libraries (torchmetrics, pycocoevalcap): this module
only feeds them. Character / setting scores are in :mod:`storygpt.evaluation.scores`."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import torch

import storygpt  # noqa: F401  (the torchvision shim, before torchmetrics imports torchvision)


class _Features(torch.nn.Module):
    """Hands torchmetrics features computed elsewhere (by the scoring actors) unchanged."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """torchmetrics' FID between two (N, d) feature sets (N >= 2 each)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(generated) < 2:
        raise ValueError(f"FID needs >= 2 frames per side, got {len(real)} real and {len(generated)} generated")
    fid = FrechetInceptionDistance(feature=_Features(real.shape[1]))
    fid.update(torch.as_tensor(real, dtype=torch.float64), real=True)
    fid.update(torch.as_tensor(generated, dtype=torch.float64), real=False)
    return float(fid.compute())


def caption_tokens(text: str) -> str:
    """Lower-cased words, punctuation dropped: what COCO's PTB tokenizer (Java) would give
    these captions, without needing Java."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def caption_scores(references: dict[str, list[str]], candidates: dict[str, str]) -> dict[str, float]:
    """BLEU-4 and CIDEr(-D) of one generated caption per frame against that frame's references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(references) != set(candidates) or not candidates:
        raise ValueError("captions: every frame needs references and one candidate")
    gts = {k: [caption_tokens(r) for r in v] for k, v in references.items()}
    res = {k: [caption_tokens(candidates[k])] for k in gts}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res)
        # references without a single word (an untrained captioner's captions of the real frames)
        # leave CIDEr's document frequencies empty, where pycocoevalcap fails: nothing can match
        has_words = any(r.split() for refs in gts.values() for r in refs)
        cider = Cider().compute_score(gts, res)[0] if has_words else 0.0
    return {"bleu4": float(bleu[3]), "cider": float(cider)}
