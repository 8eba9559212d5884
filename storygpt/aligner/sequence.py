"""The interleaved input of eq. 5, ``(BOS, I_1, S_1, …, I_{n-1}, S_{n-1}, S_n, [IMG_1..R])``.

A layout is two aligned long tensors, so the model embeds every kind of slot in one place:
``codes`` holds a token id (≥ 0), :data:`IMAGE` (one of frame j's m visual tokens) or :data:`IMG`
(an [IMG_r] token); ``slot`` says which: the row ``j·m + k`` of the visual tokens for an image
slot, ``r`` for an [IMG] slot, 0 for a token. Pure functions, no model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IMAGE, IMG = -1, -2


class Layout(NamedTuple):
    codes: torch.Tensor  # (T,) long
    slot: torch.Tensor  # (T,) long

    def __len__(self) -> int:
        return len(self.codes)


def tokens(ids: list[int]) -> Layout:
    return Layout(torch.tensor(ids, dtype=torch.long), torch.zeros(len(ids), dtype=torch.long))


def image(row: int, m: int) -> Layout:
    """The m visual slots of the frame whose feature is row ``row`` of the batch's features."""
    return Layout(torch.full((m,), IMAGE, dtype=torch.long), row * m + torch.arange(m))


def img_tokens(count: int) -> Layout:
    return Layout(torch.full((count,), IMG, dtype=torch.long), torch.arange(count))


def cat(parts: list[Layout]) -> Layout:
    if not parts:
        return tokens([])
    return Layout(torch.cat([p.codes for p in parts]), torch.cat([p.slot for p in parts]))


def story_layout(bos: list[int], captions: list[list[int]], rows: list[int], m: int, img: int) -> Layout:
    """Eq. 5 for captions S_1..S_n (token ids) and frames I_1..I_{n-1} (their feature rows);
    ``bos`` is [] or [bos_id]. ``img`` = R [IMG] slots close it (0: none, a context prefix)."""
    if len(rows) != len(captions) - 1:
        raise ValueError(f"{len(captions)} captions need {len(captions) - 1} frames before the last, got {len(rows)}")
    parts = [tokens(bos)]
    for ids, row in zip(captions[:-1], rows):
        parts += [image(row, m), tokens(ids)]
    return cat([*parts, tokens(captions[-1]), img_tokens(img)])


def frames_to_keep(frame_lengths: list[int], fixed: int, budget: int, keep_first: bool = False) -> list[int]:
    """Indices of the previous frames (I_j, S_j) to keep, dropping the earliest (frame 1 too,
    unless ``keep_first``; then it goes last) until ``fixed`` + their lengths ≤ ``budget``."""
    kept = list(range(len(frame_lengths)))
    order = kept[1:] + kept[:1] if keep_first else list(kept)
    total = fixed + sum(frame_lengths)
    for j in order:
        if total <= budget:
            break
        kept.remove(j)
        total -= frame_lengths[j]
    return kept


def truncated(captions: list[list[int]], max_length: int, m: int, img: int, bos: int) -> tuple[list[int], list[int]]:
    """Training truncation to ``max_length`` tokens: (kept previous frames, the last caption's
    ids). BOS, the last caption and the [IMG] tokens stay; the earliest frames go first; a last
    caption that cannot fit alone keeps its beginning."""
    last = captions[-1][: max(max_length - bos - img, 0)]
    kept = frames_to_keep([m + len(ids) for ids in captions[:-1]], bos + len(last) + img, max_length)
    return kept, last
