"""Where each character's name sits in the CLIP-tokenized caption (what the fuser replaces)."""

from __future__ import annotations

from storygpt.data.characters import CharacterTable
from storygpt.data.referential import find_mentions

Span = tuple[int, int]  # [start, end) token positions in the padded 77-token sequence


def name_token_spans(tokenizer, caption: str, characters: list[str], table: CharacterTable) -> list[Span | None]:
    """Per character, the tokens of its first mention in ``caption``; None if unmentioned or cut off.

    Positions index the tokenizer's full output (BOS included), i.e. the text encoder's outputs.
    """
    encoded = tokenizer(caption, return_offsets_mapping=True, truncation=True,
                        max_length=tokenizer.model_max_length)
    offsets = encoded["offset_mapping"]
    first: dict[str, tuple[int, int]] = {}
    for m in find_mentions(caption, table):
        first.setdefault(m.name, (m.start, m.end - 2 if m.possessive else m.end))
    spans: list[Span | None] = []
    for name in characters:
        if name not in first:
            spans.append(None)
            continue
        lo, hi = first[name]
        tokens = [i for i, (s, e) in enumerate(offsets) if e > s and s < hi and e > lo]
        spans.append((tokens[0], tokens[-1] + 1) if tokens else None)
    return spans
