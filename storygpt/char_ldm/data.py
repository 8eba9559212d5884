"""Record rows → a Char-LDM training batch (plain data in, tensors out; no Ray here).

Stage 1 trains on the *original* captions (paper D.3). Each character's image is the square
window around its box, with the pixels outside its mask replaced by random noise (official:
the model must take the character's look from the character, not from the scene around it).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
from transformers import CLIPImageProcessor, PreTrainedTokenizerBase

from storygpt.config import CharLDMConfig
from storygpt.data.characters import CharacterTable
from storygpt.data.record_schema import decode_png
from storygpt.data.tokens import name_token_spans


class Processors(Protocol):
    """What turns captions and character images into model inputs (a ``CharLDM`` is one)."""

    tokenizer: PreTrainedTokenizerBase
    image_processor: CLIPImageProcessor


def tokenize(tokenizer: PreTrainedTokenizerBase, captions: list[str]) -> torch.Tensor:
    """(B, 77) ids, padded and truncated as the text encoder was trained."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def square_window(box: list[float], size: int) -> tuple[int, int, int]:
    """(top, left, side): the smallest square holding ``box`` (x0, y0, x1, y1), kept in the image
    by shifting it, so the CLIP processor's centre crop cuts nothing off the character."""
    x0, y0, x1, y1 = math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])
    side = min(size, max(x1 - x0, y1 - y0, 1))
    top = min(max((y0 + y1 - side) // 2, 0), size - side)
    left = min(max((x0 + x1 - side) // 2, 0), size - side)
    return top, left, side


def character_image(
    image: np.ndarray, box: list[float], mask: np.ndarray | None, generator: torch.Generator | None
) -> np.ndarray:
    """The character's square crop, noise outside ``mask`` when there is one."""
    top, left, side = square_window(box, image.shape[0])
    crop = image[top:top + side, left:left + side]
    if mask is None:
        return crop
    noise = torch.randint(0, 256, crop.shape, generator=generator, dtype=torch.uint8).numpy()
    keep = mask[top:top + side, left:left + side, None]
    return np.where(keep, crop, noise)


def collate(
    rows: list[dict], processors: Processors, cfg: CharLDMConfig, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Record rows (``read_table(...).to_pylist()``) → the batch :meth:`CharLDM.forward` takes.

    ``char_valid``: the character has a token span (its name is in the caption) and a box;
    ``has_mask``: it has a mask (L_reg supervises characters with both). Characters past
    ``max_characters`` are dropped; free slots are zero padding.
    """
    size, chars = cfg.resolution, cfg.max_characters
    batch = len(rows)
    images, crops, crop_slots = [], [], []
    token_idx = torch.zeros(batch, chars, dtype=torch.long)
    valid = torch.zeros(batch, chars, dtype=torch.bool)
    has_mask = torch.zeros(batch, chars, dtype=torch.bool)
    masks = torch.zeros(batch, chars, size, size)
    for b, row in enumerate(rows):
        image = decode_png(row["image"])
        if image.shape[:2] != (size, size):
            raise ValueError(f"record {row['id']}: image is {image.shape[:2]}, char_ldm.resolution is {size}")
        images.append(image)
        for k, (box, span, mask_png) in enumerate(zip(row["boxes"], row["token_spans"], row["masks"])):
            if k == chars:
                break
            mask = decode_png(mask_png) if mask_png is not None else None
            if mask is not None:
                masks[b, k] = torch.from_numpy(mask).float()
                has_mask[b, k] = True
            if span is None or box is None:
                continue
            token_idx[b, k] = span[1] - 1  # i_k: the name's last token (FastComposer: the phrase end)
            valid[b, k] = True
            crops.append(character_image(image, box, mask, generator))
            crop_slots.append((b, k))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    vision_size = processors.image_processor.crop_size
    char_pixels = torch.zeros(batch, chars, 3, vision_size["height"], vision_size["width"])
    if crops:
        encoded = processors.image_processor(images=crops, return_tensors="pt").pixel_values
        char_pixels[tuple(torch.tensor(crop_slots).T)] = encoded
    return {
        "pixel_values": pixels,
        "input_ids": tokenize(processors.tokenizer, [row["caption"] for row in rows]),
        "char_pixel_values": char_pixels,
        "char_token_idx": token_idx,
        "char_valid": valid,
        "char_masks": masks,
        "has_mask": has_mask,
    }


def reference_character_inputs(
    tokenizer: PreTrainedTokenizerBase, image_processor: CLIPImageProcessor, captions: list[str], characters: list[list[str]],
    references: dict[str, np.ndarray], table: CharacterTable, max_characters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(char_pixel_values, char_token_idx, char_valid) fusing each caption's named characters with
    one reference image per character (inference: no boxes or masks in the frame to crop from)."""
    crop = image_processor.crop_size
    pixels = torch.zeros(len(captions), max_characters, 3, crop["height"], crop["width"])
    token_idx = torch.zeros(len(captions), max_characters, dtype=torch.long)
    valid = torch.zeros(len(captions), max_characters, dtype=torch.bool)
    encoded = {}
    if references:
        names = sorted(references)
        processed = image_processor(images=[references[n] for n in names], return_tensors="pt")
        encoded = dict(zip(names, processed.pixel_values))
    for b, (caption, names) in enumerate(zip(captions, characters)):
        spans = name_token_spans(tokenizer, caption, names, table)
        slots = [(n, s) for n, s in zip(names, spans) if s is not None and n in encoded][:max_characters]
        for k, (name, span) in enumerate(slots):
            pixels[b, k], token_idx[b, k], valid[b, k] = encoded[name], span[1] - 1, True
    return pixels, token_idx, valid
