"""Long stories (paper Table 5): runs of consecutive frames, each frame once.

FlintstonesSV and PororoSV stories are sliding windows (every clip starts one), so chaining
stories end to end would repeat frames. Instead each frame's *successor* is read off the
stories (frame i+1 follows frame i in every story holding both) and, for datasets whose ids
number the shots of an episode in order (FlintstonesSV, the story world), off that order too;
the successor links form chains, and a long story of N frames is N consecutive frames of one
chain. Chains are cut into whole, non-overlapping runs, in id order. Referential captions are
recomputed over the whole run (:func:`storygpt.data.referential.referential_story`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")
Position = Callable[[str], "tuple[Hashable, int] | None"]  # frame id -> (episode, place in it)


def successors(stories: Sequence[Sequence[str]], position: Position | None = None) -> dict[str, str]:
    """Frame id -> the id of the frame after it. A frame with two different successors in the
    stories is a broken dataset and raises, naming it. ``position`` adds links between frames of
    the same episode that are neighbours in shot order (and not yet linked)."""
    nxt: dict[str, str] = {}
    for story in stories:
        for a, b in zip(story, story[1:]):
            if nxt.setdefault(a, b) != b:
                raise ValueError(f"frame '{a}' is followed by '{nxt[a]}' in one story and '{b}' in another")
    if position is not None:
        episodes: dict[Hashable, list[tuple[int, str]]] = {}
        for frame in {f for story in stories for f in story}:
            where = position(frame)
            if where is not None:
                episodes.setdefault(where[0], []).append((where[1], frame))
        has_previous = set(nxt.values())
        for shots in episodes.values():
            ordered = [frame for _, frame in sorted(shots)]
            for a, b in zip(ordered, ordered[1:]):
                if a not in nxt and b not in has_previous:
                    nxt[a] = b
                    has_previous.add(b)
    return nxt


def chains(stories: Sequence[Sequence[str]], position: Position | None = None) -> list[list[str]]:
    """Maximal runs of consecutive frame ids, in the order of their first frame's id."""
    nxt = successors(stories, position)
    frames = sorted({f for story in stories for f in story})
    followed = set(nxt.values())
    out, seen = [], set()
    for start in frames:
        if start in followed or start in seen:
            continue
        chain = [start]
        seen.add(start)
        while chain[-1] in nxt and nxt[chain[-1]] not in seen:
            chain.append(nxt[chain[-1]])
            seen.add(chain[-1])
        out.append(chain)
    return out


def consecutive_runs(
    stories: Sequence[Sequence[T]], length: int, frame_id: Callable[[T], str], position: Position | None = None,
    limit: int | None = None,
) -> list[list[T]]:
    """Up to ``limit`` runs of exactly ``length`` consecutive frames (each frame once), cut from
    the chains of ``stories`` (lists of frames; ``frame_id`` reads a frame's id)."""
    if length < 1:
        raise ValueError(f"long story length must be >= 1, got {length}")
    by_id: dict[str, T] = {}
    ids = []
    for story in stories:
        ids.append([frame_id(f) for f in story])
        for f, i in zip(story, ids[-1]):
            by_id.setdefault(i, f)
    runs = []
    for chain in chains(ids, position):
        for start in range(0, len(chain) - length + 1, length):
            runs.append([by_id[i] for i in chain[start:start + length]])
            if limit is not None and len(runs) >= limit:
                return runs
    return runs
