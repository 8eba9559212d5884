"""The preprocessed record schema as Arrow/Parquet, and how to read it back.

One row per frame at the training resolution: ids, split, both captions, characters with
their boxes, name token spans and masks, setting, and the image as PNG. Errors go to a second
table: (id, story_id, stage, reason, dropped) where ``dropped`` says what the problem cost.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from storygpt.data import parts

RECORDS = pa.schema([
    ("id", pa.string()),
    ("story_id", pa.string()),
    ("frame_index", pa.int32()),
    ("split", pa.string()),
    ("caption", pa.string()),
    ("referential_caption", pa.string()),
    ("characters", pa.list_(pa.string())),
    ("boxes", pa.list_(pa.list_(pa.float32()))),  # [x0, y0, x1, y1]; null entry: no (usable) box
    ("token_spans", pa.list_(pa.list_(pa.int32()))),  # [start, end); null entry: name not in the caption
    ("masks", pa.list_(pa.binary())),  # 1-bit PNG per character; null entry: no mask
    ("setting", pa.string()),
    ("image", pa.binary()),  # PNG
    ("size", pa.int32()),
    ("source", pa.string()),
])

ERRORS = pa.schema([
    ("id", pa.string()),
    ("story_id", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("dropped", pa.string()),  # frame | box | character
])


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array) if array.dtype != bool else Image.fromarray(array).convert("1")
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L")) > 0 if img.mode == "1" else np.asarray(img.convert("RGB"))


def read_table(root: str | Path, kind: str = "records", columns: list[str] | None = None,
               filters: list | None = None) -> pa.Table:
    """The finished parts of ``root/<kind>/`` as one table (:func:`storygpt.data.parts.read`:
    a part without its done marker is not read; empty with the schema if none)."""
    return parts.read(root, kind, RECORDS if kind == "records" else ERRORS, columns, filters)
