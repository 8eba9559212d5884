"""Reference resolution, measured on the conditioning itself (no image needed).

A pronoun frame ("he sits down") is resolved when the aligner's conditioning lies nearest —
cosine on the flattened L·d embedding — to the mean fused embedding of the frames that show
the same character set. Callers pass only the pronoun frames; chance is 1 / number of sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def character_centroids(
    targets: torch.Tensor, character_sets: list[tuple[str, ...]]
) -> dict[tuple[str, ...], torch.Tensor]:
    """(N, L, d) fused embeddings → {sorted character set: (L, d) mean embedding}."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, names in enumerate(character_sets):
        groups.setdefault(tuple(sorted(names)), []).append(i)
    return {key: targets[rows].float().mean(0) for key, rows in groups.items()}


def reference_accuracy(
    predicted: torch.Tensor, character_sets: list[tuple[str, ...]], centroids: dict[tuple[str, ...], torch.Tensor]
) -> tuple[float, float]:
    """(share of frames nearest their own set's centroid, chance = 1 / len(centroids)); a frame
    whose set has no centroid counts as wrong; NaN for no frames."""
    if not centroids:
        raise ValueError("no centroids: nothing to compare against")
    keys = list(centroids)
    chance = 1.0 / len(keys)
    if len(predicted) == 0:
        return float("nan"), chance
    table = F.normalize(torch.stack([centroids[k] for k in keys]).flatten(1).float(), dim=-1)
    nearest = (F.normalize(predicted.flatten(1).float(), dim=-1) @ table.T).argmax(-1).tolist()
    hits = [keys[j] == tuple(sorted(names)) for j, names in zip(nearest, character_sets)]
    return sum(hits) / len(hits), chance
