"""Reference resolution, measured on the conditioning itself (no image needed).

A pronoun frame ("she sits down with Bruno") is resolved when the aligner's conditioning is
nearer — cosine on the flattened L·d embedding — to the fused embedding of the right cast
than to that of any other cast *of the same caption*. The candidates are the frame's original
caption ("Emma sits down with Bruno") and every caption made from it by swapping one of its
characters for one it does not show ("Ada sits down with Bruno", ...), each fused with the
named characters' reference images. Only who is in the frame differs between candidates, so
the setting and action, which dominate the embedding, cannot decide the vote. Chance is
1 / number of candidates, averaged over the frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from storygpt.data.characters import CharacterTable


def swap_character(caption: str, old: str, new: str, table: CharacterTable) -> str:
    """``caption`` with every mention of character ``old`` (any spelling) written as ``new``."""
    def replace(match):
        character = table.get(match.group(0))
        return new if character is not None and character.name == old else match.group(0)

    return table.mention_pattern.sub(replace, caption)


def candidate_casts(
    caption: str, characters: list[str], cast: list[str], table: CharacterTable
) -> list[tuple[str, list[str]]]:
    """[(caption, characters)]: the frame's own first, then each one-character swap with a
    character of ``cast`` the frame does not show (only characters the caption names are swapped)."""
    named = {table.get(m.group(0)).name for m in table.mention_pattern.finditer(caption)}
    candidates = [(caption, list(characters))]
    for i, character in enumerate(characters):
        if character not in named:
            continue
        for other in cast:
            if other not in characters:
                swapped = [*characters[:i], other, *characters[i + 1:]]
                candidates.append((swap_character(caption, character, other, table), swapped))
    return candidates


def fused_candidates(encoder, frames: list[tuple[str, list[str]]], references: dict, table: CharacterTable,
                     ) -> list[torch.Tensor]:
    """Per (caption, characters) frame, the fused embeddings (K, L, d) of its candidate casts, the
    right cast first. ``encoder``: a ``StageTwoTargets`` (the Char-LDM's encoders the targets were
    made with); ``references``: name → reference crop; only characters with a crop are swapped in."""
    cast = sorted(references)
    out = []
    for caption, characters in frames:
        casts = candidate_casts(caption, list(characters), cast, table)
        out.append(encoder.encode_named([c for c, _ in casts], [n for _, n in casts], references, table).float())
    return out


def conditioning_cosine(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cosine between each predicted (L, d) conditioning and its fused target, flattened:
    how close the mapper gets whoever the referent."""
    return F.cosine_similarity(predicted.flatten(1).float(), targets.flatten(1).float()).mean().item()


def reference_accuracy(predicted: torch.Tensor, candidates: list[torch.Tensor]) -> tuple[float, float]:
    """(share of frames whose prediction is nearest its candidate 0, chance = mean 1 / candidates).

    ``predicted``: (N, L, d); ``candidates[i]``: (K_i, L, d), the right cast first. A frame with a
    single candidate (nobody to swap) says nothing and is left out. NaN when no frame is left."""
    if len(predicted) != len(candidates):
        raise ValueError(f"{len(predicted)} predictions but {len(candidates)} candidate sets")
    hits, chances = [], []
    for prediction, options in zip(predicted, candidates):
        if len(options) < 2:
            continue
        similarity = F.normalize(options.flatten(1).float(), dim=-1) @ F.normalize(prediction.flatten().float(), dim=0)
        hits.append(int(similarity.argmax()) == 0)
        chances.append(1 / len(options))
    if not hits:
        return float("nan"), float("nan")
    return sum(hits) / len(hits), sum(chances) / len(chances)
