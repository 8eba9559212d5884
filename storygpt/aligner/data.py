"""Precomputed frame rows → stage-2 examples → a training batch (plain data in, tensors out).

A story of N frames gives N examples, one per n: the *referential* captions S_1..S_n (the LM must
resolve "he", "they"), the CLIP features of frames 1..n-1 (ground-truth frames in training) and,
as the target, frame n's fused embedding of its *non-referential* caption (precomputed by the
Char-LDM). n = 1 is what frame 1 needs at inference. Examples hold plain Python values only:
they travel through Ray Data (Arrow).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from storygpt.aligner.sequence import Layout, story_layout, truncated
from storygpt.config import AlignerConfig


class Aligner(Protocol):
    """What turns examples into model inputs (a ``StoryAligner`` is one)."""

    config: AlignerConfig
    tokenizer: PreTrainedTokenizerBase
    bos: list[int]
    clip_dim: int
    out_dim: int

    def tokenize(self, captions: list[str]) -> list[list[int]]: ...


def visual_slots(cfg: AlignerConfig) -> int:
    """Visual tokens per earlier frame in the LM's input: m, or 0 for the captions-only ablation."""
    return cfg.visual_tokens if cfg.interleave else 0


def story_examples(frames: list[dict]) -> list[dict]:
    """One story's precomputed rows (any order) → one example per n = 1..N."""
    frames = sorted(frames, key=lambda f: f["frame_index"])
    examples = []
    for n, frame in enumerate(frames, start=1):
        examples.append({
            "story_id": frame["story_id"], "id": frame["id"], "n": n,
            "captions": [f["referential_caption"] for f in frames[:n]],
            "frame_features": [list(f["frame_feature"]) for f in frames[:n - 1]],
            "target": list(frame["fused"]), "characters": list(frame["characters"]),
            "caption": frame["caption"],  # S'_n, names not pronouns: reference accuracy swaps its cast
            "pronoun": frame["referential_caption"] != frame["caption"],
        })
    return examples


def collate(examples: list[dict], aligner: Aligner) -> dict[str, torch.Tensor]:
    """{"codes", "slot" (B, T) long, "attention_mask" (B, T), "frame_features" (F, d_clip) (every
    example's kept frames, which ``slot`` indexes), "target" (B, L, d)}, truncated to
    ``max_length`` (earliest frames dropped) and right-padded."""
    cfg = aligner.config
    m, r = visual_slots(cfg), cfg.img_tokens
    layouts: list[Layout] = []
    features: list[np.ndarray] = []
    for ex in examples:  # lists, or the numpy arrays Ray Data hands back
        captions = aligner.tokenize([str(c) for c in ex["captions"]])
        kept, last = truncated(captions, cfg.max_length, m, r, len(aligner.bos))
        rows = list(range(len(features), len(features) + len(kept)))
        features += [np.asarray(ex["frame_features"][j], dtype=np.float32) for j in kept]
        layouts.append(story_layout(aligner.bos, [captions[j] for j in kept] + [last], rows, m, r))
    width = max(len(x) for x in layouts)
    codes = torch.zeros(len(layouts), width, dtype=torch.long)  # id 0 under the mask: any real token
    slot = torch.zeros_like(codes)
    mask = torch.zeros_like(codes)
    for b, x in enumerate(layouts):
        codes[b, :len(x)], slot[b, :len(x)], mask[b, :len(x)] = x.codes, x.slot, 1
    shape = (cfg.mapper_queries, aligner.out_dim)
    targets = []
    for ex in examples:
        if len(ex["target"]) != shape[0] * shape[1]:
            raise ValueError(f"frame '{ex['id']}': fused embedding of {len(ex['target'])} values, expected "
                             f"{shape[0]}x{shape[1]} (mapper_queries x the CLIP text width)")
        targets.append(torch.from_numpy(np.asarray(ex["target"], dtype=np.float32)).view(shape))
    stacked = np.stack(features) if features else np.zeros((0, aligner.clip_dim), dtype=np.float32)
    return {"codes": codes, "slot": slot, "attention_mask": mask, "frame_features": torch.from_numpy(stacked),
            "target": torch.stack(targets)}
