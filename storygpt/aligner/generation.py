"""The story loop (paper §3.3 "Inference", appendix A): frame i is drawn from the LM's [IMG]
states given every earlier *generated* frame (fed back through CLIP → W_v2t) and caption.

The LM keeps its KV cache across frames (the official code recomputes the whole context for
each one). The training layout puts I_j *before* S_j, yet I_j exists only once S_j is drawn; so
the cache holds the committed prefix ``(BOS, I_1, S_1, …, I_{i-2}, S_{i-2})`` and frame i appends
``(I_{i-1}, S_{i-1}, S_i, [IMG])``, then is cropped back to the new prefix (S_i and the [IMG]
tokens are dropped: their positions change once I_i exists). Constant work per frame, exactly
the training layout. Past the context window the oldest middle frames are dropped (BOS and
frame 1 stay) and the cache is rebuilt over what is kept: a long story runs in flat memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from storygpt.aligner.data import visual_slots
from storygpt.aligner.model import StoryAligner
from storygpt.aligner.sequence import Layout, cat, frames_to_keep, image, img_tokens, tokens

# Past the window, drop frames until the context is at most this share of it: the rebuild
# (O(window) tokens) then comes once per many frames instead of at every frame.
WINDOW_REFILL = 0.75


@dataclass
class GeneratedFrame:
    index: int  # 0-based, in the story
    caption: str
    conditioning: torch.Tensor  # (L, d), CPU
    image: np.ndarray  # (H, W, 3) uint8
    written: bool = False  # the LM wrote this caption (continuation)


@dataclass
class _Story:
    """One story's kept context: the kept earlier frames (caption ids, CLIP feature), the first
    ``committed`` of which are in ``cache``."""

    frames: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    committed: int = 0
    cache: DynamicCache | None = None
    drawn: int = 0


class StoryGenerator:
    def __init__(
        self,
        aligner: StoryAligner,
        draw: Callable[[torch.Tensor, int, str], np.ndarray],
        context_window: int | None = None,
        use_cache: bool = True,
        draw_first: Callable[[torch.Tensor, int, str], np.ndarray] | None = None,
    ):
        """``draw(conditioning (1, L, d), seed, caption)`` renders a frame (a ``CharLDMPipeline``
        called with ``conditioning=`` and the caption as ``plain_captions=``, which only delayed
        conditioning reads); ``context_window``: tokens kept (None: the LM's context); ``use_cache``
        off recomputes the whole kept context for each frame (the official code's way);
        ``draw_first``: frame 1's own ``draw`` (default: ``draw``).
        Inspectable: ``window``, ``story`` (the latest story's kept frames and cache),
        ``cache_length``, ``longest_context`` (the most tokens one LM call attended over)."""
        limit = aligner.lm.config.max_position_embeddings
        if context_window is not None and context_window > limit:
            raise ValueError(f"context_window {context_window} exceeds the LM's {limit} positions")
        self.aligner, self.draw, self.use_cache = aligner, draw, use_cache
        self.draw_first = draw_first or draw
        self.window = context_window or limit
        self.m, self.r = visual_slots(aligner.config), aligner.config.img_tokens
        self.story: _Story | None = None  # the latest story: its cache, for inspection
        self.longest_context = 0  # the most tokens the LM has attended over, since construction

    # ------------------------------------------------------------------------- public
    def stream(self, captions: list[str], seed: int = 0) -> Iterator[GeneratedFrame]:
        """One frame per caption, each yielded as soon as it is drawn (frame i's ``draw`` seed:
        ``seed + i``)."""
        self.story = story = _Story()
        yield from self._draw_captions(story, captions, seed)

    def continue_story(self, captions: list[str], k: int, seed: int = 0) -> Iterator[GeneratedFrame]:
        """Draw ``captions``, then ``k`` times let the LM write the next caption (greedy; it stops
        where [IMG_1] is likeliest, at EOS, a newline or ``caption_max_tokens``) and draw it."""
        self.story = story = _Story()
        yield from self._draw_captions(story, captions, seed)
        for _ in range(k):
            yield self._frame(story, self._write(story), seed, written=True)

    @property
    def cache_length(self) -> int:
        story = self.story
        return story.cache.get_seq_length() if story is not None and story.cache is not None else 0

    # ------------------------------------------------------------------------- frames
    def _draw_captions(self, story: _Story, captions: list[str], seed: int) -> Iterator[GeneratedFrame]:
        for caption, ids in zip(captions, self.aligner.tokenize(captions)):
            yield self._frame(story, ids, seed, caption=caption)

    @torch.no_grad()
    def _frame(self, story: _Story, ids: list[int], seed: int, written: bool = False,
               caption: str | None = None) -> GeneratedFrame:
        """``caption``: the text as given (default: ``ids`` decoded, for a caption the LM wrote)."""
        a = self.aligner
        ids = ids[: self.window - len(a.bos) - self.r]  # a caption longer than the whole window
        self._fit(story, len(ids) + self.r)
        hidden = self._run(story, cat([tokens(ids), img_tokens(self.r)]), commit=self.use_cache)
        conditioning = a.conditioning(hidden[:, -self.r:])  # (1, L, d)
        text = caption if caption is not None else a.tokenizer.decode(ids, skip_special_tokens=True).strip()
        draw = self.draw_first if story.drawn == 0 else self.draw
        frame = draw(conditioning, seed + story.drawn, text)
        story.frames.append((ids, a.frame_features([frame])[0]))
        story.drawn += 1
        return GeneratedFrame(story.drawn - 1, text, conditioning[0].float().cpu(), frame, written)

    @torch.no_grad()
    def _write(self, story: _Story) -> list[int]:
        """Greedy next caption after the kept context. Written over a cache even when
        ``use_cache`` is off (its cache is dropped after)."""
        a, limit = self.aligner, self.aligner.config.caption_max_tokens
        self._fit(story, limit + self.r)  # room for the longest caption and its [IMG] tokens
        cache, committed = story.cache, story.committed
        if not self.use_cache:
            story.cache, story.committed = None, 0
        hidden = self._run(story, tokens([]), commit=True)
        ids: list[int] = []
        while len(ids) < limit:
            logits = a.logits(hidden[0, -1])
            token = int(logits.argmax())
            vocab = logits.shape[-1] - self.r
            if token >= vocab or token == a.tokenizer.eos_token_id or "\n" in a.tokenizer.decode([token]):
                break
            ids.append(token)
            codes = torch.tensor([[token]], device=a.device)
            hidden = a.hidden(a.embed(codes, torch.zeros_like(codes), None), cache=story.cache)
        if self.use_cache:
            story.cache.crop(-len(ids))  # back to the prefix: the caption is re-read with its frame
        else:
            story.cache, story.committed = cache, committed
        return ids

    # ------------------------------------------------------------------------- context
    def _prefix(self, story: _Story, frames: range, bos: bool) -> tuple[Layout, torch.Tensor]:
        """The layout of kept frames ``frames`` (after BOS if ``bos``) and their features."""
        parts = [tokens(self.aligner.bos)] if bos else []
        for row, j in enumerate(frames):
            parts += [image(row, self.m), tokens(story.frames[j][0])]
        features = [story.frames[j][1] for j in frames]
        return cat(parts), torch.stack(features) if features else torch.zeros(0, self.aligner.clip_dim)

    def _length(self, story: _Story) -> int:
        return len(self.aligner.bos) + sum(self.m + len(ids) for ids, _ in story.frames)

    def _fit(self, story: _Story, reserve: int) -> None:
        """Make room for ``reserve`` more tokens: past the window, drop the oldest middle frames
        (then frame 1) down to :data:`WINDOW_REFILL` of it; a dropped committed frame voids the cache."""
        if self._length(story) + reserve <= self.window:
            return
        lengths = [self.m + len(ids) for ids, _ in story.frames]
        kept = frames_to_keep(lengths, len(self.aligner.bos) + reserve, int(WINDOW_REFILL * self.window),
                              keep_first=True)
        first_dropped = next((j for j in range(len(lengths)) if j not in kept), len(lengths))
        if first_dropped < story.committed:
            story.cache, story.committed = None, 0
        story.frames = [story.frames[j] for j in kept]

    def _run(self, story: _Story, tail: Layout, commit: bool) -> torch.Tensor:
        """The LM over the uncommitted kept frames + ``tail``, after the cached prefix (none:
        from BOS). ``commit``: the cache keeps the frames, not the tail. (1, T, e) hidden states."""
        a = self.aligner
        if not commit:
            story.cache, story.committed = None, 0
        layout, features = self._prefix(story, range(story.committed, len(story.frames)), bos=story.cache is None)
        layout = cat([layout, tail])
        cache = story.cache if story.cache is not None else (DynamicCache(config=a.lm.config) if commit else None)
        past = cache.get_seq_length() if cache is not None else 0
        embeds = a.embed(layout.codes[None].to(a.device), layout.slot[None].to(a.device), features)
        hidden = a.hidden(embeds, cache=cache)
        self.longest_context = max(self.longest_context, past + len(layout))
        if commit:
            cache.crop(-len(tail))  # transformers 5: crop(-n) removes the last n tokens (0: none)
            story.cache, story.committed = cache, len(story.frames)
        return hidden
