"""Load the pixels and masks a :class:`~storygpt.data.records.Frame` points at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from storygpt.data.errors import DatasetError
from storygpt.data.records import ImageSource, MaskSource


def npy_clip_shape(path: Path) -> tuple[int, ...]:
    """Shape of a ``.npy`` without reading its data (memory-mapped header)."""
    return tuple(np.load(path, mmap_mode="r").shape)


def load_image(src: ImageSource) -> np.ndarray:
    """(H, W, 3) uint8."""
    path = Path(src.path)
    if not path.is_file():
        raise DatasetError(src.path, None, "image file is missing")
    try:
        if src.kind == "npy_clip":
            arr = np.load(path, mmap_mode="r")
            frame = arr[src.clip_frame] if arr.ndim == 4 else arr
        else:
            with Image.open(path) as img:
                strip = np.asarray(img.convert("RGB"))
            w = strip.shape[1]
            frame = strip[src.clip_frame * w : (src.clip_frame + 1) * w]
    except (ValueError, OSError, IndexError) as err:
        raise DatasetError(src.path, None, f"unreadable image: {err}") from None
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] != frame.shape[1]:
        raise DatasetError(src.path, None, f"expected a square (H, W, 3) frame, got {frame.shape}")
    return frame.astype(np.uint8, copy=False)


def load_masks(src: MaskSource) -> np.ndarray:
    """(K, H, W) bool, one per character; all-False where a character has no segment."""
    path = Path(src.path)
    if not path.is_file():
        raise DatasetError(src.path, None, "mask file is missing")
    arr = np.load(path, mmap_mode="r")
    seg = np.asarray(arr[src.clip_frame] if src.kind == "segment_map_clip" else arr)
    if seg.ndim != 2:
        raise DatasetError(src.path, None, f"expected a (H, W) segment map, got {seg.shape}")
    masks = [seg == sid if sid is not None else np.zeros(seg.shape, bool) for sid in src.segment_ids]
    return np.stack(masks) if masks else np.zeros((0, *seg.shape), bool)
