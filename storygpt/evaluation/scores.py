"""Scores of the frame classifier's outputs (paper Table 1: Char-Acc / Char-F1, BG-Acc / BG-F1).

Pure numpy, no torch: the training job's held-out figures and the evaluation job use the same
functions. Every score is a fraction in [0, 1] (the paper prints percentages).

Characters (multi-label, the classifier's sigmoid outputs thresholded at 0.5):
  * ``acc``: exact match, the share of frames whose predicted character *set* equals the true one
    (a frame with nobody in it counts too, and is right only when nobody is predicted);
  * ``f1``: micro F1 over all (frame, character) pairs, ``2 TP / (2 TP + FP + FN)``: the reference
    evaluation script pools true positives, predicted positives and true positives over the
    whole split (AR-LDM / StoryGPT-V).

Settings in Table 1 (:func:`predicted_setting_scores`), as the reference script scores them: a
sigmoid logit per setting thresholded at 0.5, so a frame may be given no setting or several.
  * ``acc``: exact match, the share of frames whose predicted setting *set* is exactly {the true
    setting};
  * ``f1``: micro F1 over all (frame, setting) pairs, as for characters.

Single-label settings (:func:`setting_scores`: one predicted setting per frame, e.g. the world's
exact detector): ``acc`` the share right; ``f1`` macro by default (with one label per frame micro
F1 equals accuracy), ``average="micro"`` for the micro figure; a ``None`` prediction abstains.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np


def _as_sets(items) -> list[frozenset]:
    """Character sets from lists / sets of names, or from a 2-D multi-hot (or 0/1 score) array."""
    if isinstance(items, np.ndarray):
        if items.ndim != 2:
            raise ValueError(f"multi-hot character labels must be 2-D (frames, characters), got shape {items.shape}")
        return [frozenset(np.flatnonzero(row > 0.5).tolist()) for row in items]
    out = []
    for item in items:
        if isinstance(item, str):
            raise ValueError(f"expected a collection of character names per frame, got the string {item!r}")
        out.append(frozenset(item))
    return out


def _f1(tp: int, fp: int, fn: int) -> float:
    """F1 = 2TP / (2TP + FP + FN); 1.0 when there was nothing to find and nothing was claimed."""
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2 * tp / denominator


def character_scores(pred_sets: Iterable, true_sets: Iterable) -> dict[str, float]:
    """Char-Acc (exact set match) and Char-F1 (micro) over frames.

    ``pred_sets`` / ``true_sets``: one collection of character names per frame (lists or sets), or
    2-D multi-hot arrays in the same character order.
    """
    pred, true = _as_sets(pred_sets), _as_sets(true_sets)
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predicted frames but {len(true)} true frames")
    if not true:
        raise ValueError("no frames to score")
    tp = sum(len(p & t) for p, t in zip(pred, true))
    fp = sum(len(p - t) for p, t in zip(pred, true))
    fn = sum(len(t - p) for p, t in zip(pred, true))
    return {"acc": sum(p == t for p, t in zip(pred, true)) / len(true), "f1": _f1(tp, fp, fn)}


def _labelled_pairs(pred: Sequence, true: Sequence) -> list[tuple]:
    """(prediction, true setting) of the frames that have a true setting (not None or "")."""
    pred, true = list(pred), list(true)
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predicted frames but {len(true)} true frames")
    pairs = [(p, t) for p, t in zip(pred, true) if t is not None and t != ""]
    if not pairs:
        raise ValueError("no frames with a true setting to score")
    return pairs


def predicted_setting_scores(pred_sets: Sequence, true: Sequence) -> dict[str, float]:
    """BG-Acc (exact set match) and BG-F1 (micro) of the classifier's thresholded setting sets
    against one true setting per frame; frames without a true setting are not scored."""
    pairs = _labelled_pairs(pred_sets, true)
    return character_scores([p for p, _ in pairs], [[t] for _, t in pairs])


def setting_scores(
    pred: Sequence, true: Sequence, average: Literal["macro", "micro"] = "macro"
) -> dict[str, float]:
    """BG-Acc (argmax accuracy) and BG-F1 (macro by default; see the module docstring).

    ``pred`` / ``true``: one setting per frame (names or ids). A ``None`` prediction is an
    abstention (wrong, claims nothing); frames whose true setting is ``None`` or ``""`` (none
    annotated) are not scored.
    """
    pairs = _labelled_pairs(pred, true)
    acc = sum(p == t for p, t in pairs) / len(pairs)
    if average == "micro":
        tp = sum(p == t for p, t in pairs)
        claimed = sum(p is not None for p, _ in pairs)
        return {"acc": acc, "f1": _f1(tp, claimed - tp, len(pairs) - tp)}
    if average != "macro":
        raise ValueError(f"average: expected 'macro' or 'micro', got {average!r}")
    labels = {t for _, t in pairs} | {p for p, _ in pairs if p is not None}
    per_label = []
    for label in labels:
        tp = sum(p == label and t == label for p, t in pairs)
        fp = sum(p == label and t != label for p, t in pairs)
        fn = sum(t == label and p != label for p, t in pairs)
        per_label.append(_f1(tp, fp, fn))
    return {"acc": acc, "f1": float(np.mean(per_label))}
