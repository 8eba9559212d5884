"""Reference images of the characters: what the Char-LDM fuses a name with when the frame to
draw has no crop of its own (sampling, evaluation, the aligner's candidate casts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from storygpt.char_ldm.data import character_image
from storygpt.data.record_schema import decode_png


def reference_crops(rows: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """Name → its first crop in ``rows``, noise outside the mask, as training fuses it."""
    generator = torch.Generator().manual_seed(seed)
    crops: dict[str, np.ndarray] = {}
    for row in rows:
        image = decode_png(row["image"])
        for name, box, mask in zip(row["characters"], row["boxes"], row["masks"]):
            if name not in crops and box is not None:
                crops[name] = character_image(image, box, decode_png(mask) if mask else None, generator)
    return crops


def train_reference_crops(records_dir: str | Path, names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """One crop per character from the train split of a records dir (``storygpt preprocess``),
    reading batches only until every one of ``names`` has one."""
    import pyarrow.dataset as pads

    from storygpt.data.parts import finished_files

    crops: dict[str, np.ndarray] = {}
    scanner = pads.dataset(finished_files(records_dir, "records"), format="parquet").scanner(
        columns=["image", "characters", "boxes", "masks"], filter=pads.field("split") == "train")
    for batch in scanner.to_batches():
        for name, crop in reference_crops(batch.to_pylist(), seed).items():
            crops.setdefault(name, crop)
        if set(names) <= crops.keys():
            break
    return crops
