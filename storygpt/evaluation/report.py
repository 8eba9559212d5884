"""Scored frames → the figures of one Table-1 row, and the Markdown tables laid out like the
paper's Table 1 (plus the long-story Char-Acc table)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from storygpt.evaluation.metrics import caption_scores, frechet_distance
from storygpt.evaluation.scores import character_scores, predicted_setting_scores, setting_scores

LABELS = {"char_ldm": "Char-LDM", "storygpt": "StoryGPT-V", "ground_truth": "Ground truth",
          "most_frequent": "Most frequent (chance)"}
COLUMNS = [("char_acc", "Char-Acc ↑", "pct"), ("char_f1", "Char-F1 ↑", "pct"), ("bg_acc", "BG-Acc ↑", "pct"),
           ("bg_f1", "BG-F1 ↑", "pct"), ("fid", "FID ↓", "fid"), ("bleu4", "BLEU4 ↑", "dec"),
           ("cider", "CIDEr ↑", "dec"), ("bleu4_human", "BLEU4 (human) ↑", "dec"),
           ("cider_human", "CIDEr (human) ↑", "dec")]
DETECTOR_COLUMNS = [("det_char_acc", "Det. Char-Acc ↑", "pct"), ("det_char_f1", "Det. Char-F1 ↑", "pct"),
                    ("det_bg_acc", "Det. BG-Acc ↑", "pct")]


def summarize(frames: list[dict], real_features: np.ndarray | None,
              truth_captions: dict[str, list[str]] | None = None) -> dict[str, float]:
    """One row's figures from its scored frames (each: the record's ``id``, ``characters``,
    ``setting``, ``caption`` beside the scorer's outputs). ``real_features``: the ground truth's,
    for FID. ``truth_captions``: the captioner's captions of each ground-truth frame by id (its
    ``evaluate.captioner.references`` best beams), the references of BLEU4 / CIDEr as the paper
    scores them (appendix C.1: one caption of a generated frame against five of the real frame,
    not the human caption); the human-caption variant is kept as ``bleu4_human`` / ``cider_human``."""
    truth = [f["characters"] for f in frames]
    out = {"frames": len(frames)}
    out.update(_prefixed("char_", character_scores([f["pred_characters"] for f in frames], truth)))
    if frames[0]["pred_setting"] is not None:
        out.update(_prefixed("bg_", predicted_setting_scores([f["pred_setting"] for f in frames],
                                                             [f["setting"] for f in frames])))
    if frames[0]["detected_characters"] is not None:
        out.update(_prefixed("det_char_", character_scores([f["detected_characters"] for f in frames], truth)))
        out["det_bg_acc"] = setting_scores([f["detected_setting"] for f in frames], [f["setting"] for f in frames])["acc"]
        out.update(_by_frame_kind(frames))
    if real_features is not None:
        out["fid"] = frechet_distance(real_features, np.stack([f["feature"] for f in frames]))
    generated = {str(k): f["generated_caption"] for k, f in enumerate(frames)}
    out.update(_prefixed("", caption_scores({str(k): [f["caption"]] for k, f in enumerate(frames)}, generated),
                         suffix="_human"))
    if truth_captions is not None:
        out.update(caption_scores({str(k): list(truth_captions[f["id"]]) for k, f in enumerate(frames)}, generated))
    return out


def _by_frame_kind(frames: list[dict]) -> dict[str, float]:
    """Det. Char-Acc and BG-Acc on the frames whose referential caption has a pronoun and on the
    others: the first is what resolution buys, the second what the drawing path costs when nothing
    needs it. BG-Acc is split too: on the world it falls as more characters are drawn
    (docs/results.md), so a row that draws nobody on the pronoun frames gains BG-Acc there, while
    on the named frames every row reads the same caption."""
    pronoun = [f.get("referential_caption") not in (None, f["caption"]) for f in frames]
    out = {"pronoun_frames": sum(pronoun)}
    for name, kind in (("pronoun", True), ("named", False)):
        subset = [f for f, p in zip(frames, pronoun) if p == kind]
        if subset:
            out[f"det_char_acc_{name}"] = character_scores([f["detected_characters"] for f in subset],
                                                           [f["characters"] for f in subset])["acc"]
        if any(f["setting"] for f in subset):
            out[f"det_bg_acc_{name}"] = setting_scores([f["detected_setting"] for f in subset],
                                                       [f["setting"] for f in subset])["acc"]
    return out


def most_frequent(train: list[dict], frames: list[dict]) -> dict[str, float]:
    """The chance row: every frame given the train split's most frequent character set and setting."""
    top_set = Counter(tuple(sorted(r["characters"])) for r in train).most_common(1)[0][0]
    out = _prefixed("char_", character_scores([list(top_set)] * len(frames), [f["characters"] for f in frames]))
    settings = [r["setting"] for r in train if r["setting"]]
    if settings:
        top = Counter(settings).most_common(1)[0][0]
        out.update(_prefixed("bg_", predicted_setting_scores([[top]] * len(frames), [f["setting"] for f in frames])))
    return out


def markdown(results: dict[str, dict], long_results: dict[str, dict[int, dict]], story_frames: int,
             detector: bool) -> str:
    """Table 1 (rows: ``method/captions`` keys of ``results``) and, when there are long-story
    runs, Table 5: Char-Acc and FID by story length."""
    columns = COLUMNS + (DETECTOR_COLUMNS if detector else [])
    lines = ["| Method | Captions | " + " | ".join(c[1] for c in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for row, figures in results.items():
        method, _, captions = row.partition("/")
        cells = [_cell(figures.get(key), kind) for key, _, kind in columns]
        lines.append(f"| {LABELS.get(method, method)} | {captions or '–'} | " + " | ".join(cells) + " |")
    if long_results:
        lengths = sorted({n for by_length in long_results.values() for n in by_length})
        name = "Det. Char-Acc" if detector else "Char-Acc"
        for key, title, kind in (("char_acc", f"{name} ↑", "pct"), ("fid", "FID ↓", "fid")):
            lines += ["", f"{title} by story length (frames; {story_frames} = the test stories):", "",
                      "| Method | Captions | " + " | ".join(str(n) for n in lengths) + " |",
                      "|---|---|" + "---:|" * len(lengths)]
            for row, by_length in long_results.items():
                method, _, captions = row.partition("/")
                lines.append(f"| {LABELS.get(method, method)} | {captions} | "
                             + " | ".join(_cell(by_length.get(n, {}).get(key), kind) for n in lengths) + " |")
    return "\n".join(lines) + "\n"


def _prefixed(prefix: str, scores: dict[str, float], suffix: str = "") -> dict[str, float]:
    return {prefix + k + suffix: v for k, v in scores.items()}


def _cell(value: float | None, kind: str) -> str:
    if value is None:
        return "–"
    return {"pct": f"{100 * value:.2f}", "fid": f"{value:.2f}", "dec": f"{value:.4f}"}[kind]


def decomposition(results: dict[str, dict]) -> dict[str, float | None]:
    """Where StoryGPT-V's referential score comes from, by the exact detector's Char-Acc (the
    classifier's without one): ``storygpt_v_ratio`` = StoryGPT-V referential ÷ Char-LDM named
    (the paper's 87.96 / 90.36 = 0.97), ``resolution_gain`` = StoryGPT-V referential ÷ Char-LDM
    referential (what resolving the pronouns bought), ``mapper_ratio`` = StoryGPT-V named ÷
    Char-LDM named (what the LM → mapper path loses when nothing needs resolving). None where a
    row is missing or the divisor is 0."""
    key = "det_char_acc" if "det_char_acc" in results.get("storygpt/referential", {}) else "char_acc"
    acc = {row: figures.get(key) for row, figures in results.items() if isinstance(figures, dict)}

    def ratio(a: str, b: str) -> float | None:
        return round(acc[a] / acc[b], 3) if acc.get(a) is not None and acc.get(b) else None

    return {"storygpt_v_ratio": ratio("storygpt/referential", "char_ldm/original"),
            "resolution_gain": ratio("storygpt/referential", "char_ldm/referential"),
            "mapper_ratio": ratio("storygpt/original", "char_ldm/original")}


def referential_verdict(results: dict[str, dict]) -> str | None:
    """One line saying which row drew referential captions better, StoryGPT-V or the Char-LDM
    alone, by the exact detector's Char-Acc (the classifier's where there is no detector), and
    whether the gap exceeds two standard errors of the difference (binomial, the rows' frames)."""
    if "storygpt/referential" not in results or "char_ldm/referential" not in results:
        return None
    ours, base = results["storygpt/referential"], results["char_ldm/referential"]
    key = "det_char_acc" if "det_char_acc" in ours else "char_acc"
    a, b = ours[key], base[key]
    se = math.sqrt(a * (1 - a) / ours["frames"] + b * (1 - b) / base["frames"])
    ceiling = results.get("char_ldm/original", {}).get(key)
    scores = (f"referential captions, {'exact detector ' if key.startswith('det') else ''}Char-Acc: StoryGPT-V "
              f"{100 * a:.1f} %, Char-LDM alone {100 * b:.1f} %"
              + (f" (Char-LDM on named captions {100 * ceiling:.1f} %)" if ceiling is not None else ""))
    if abs(a - b) <= 2 * se:
        return f"{scores}: no clear winner (within two standard errors, {100 * 2 * se:.1f} points)"
    return f"{scores}: {'StoryGPT-V' if a > b else 'the Char-LDM alone'} wins"
