"""The pipeline's stages as Ray Data callables. Each converts a pyarrow batch to rows, calls
the library step from ``storygpt.vision.prepare`` and converts back; no model math here."""

from __future__ import annotations

import time
from functools import lru_cache

import pyarrow as pa
import torch

from storygpt.vision import prepare
from storygpt.data.characters import get_table
from storygpt.models.loading import load_clip_tokenizer
from storygpt.training import pick_device
from storygpt.vision.masks import BoxMasker
from storygpt.vision.super_resolution import SuperResolver

ROW_SCHEMA = pa.schema([("id", pa.string()), ("meta", pa.string()), ("image", pa.binary()), ("masks", pa.binary())])


def _rows(batch: pa.Table) -> list[dict]:
    return batch.to_pylist()


def _batch(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, ROW_SCHEMA)


@lru_cache(maxsize=4)
def _tokenizer(clip_text_dir: str):
    return load_clip_tokenizer(clip_text_dir)  # once per worker process


def load_and_validate(batch: pa.Table, dataset: str, clip_text_dir: str, dataset_masks: bool) -> pa.Table:
    table, tokenizer = get_table(dataset), _tokenizer(clip_text_dir)
    return _batch([prepare.load_and_validate(r, table, tokenizer, dataset_masks) for r in _rows(batch)])


class SuperResolve:
    def __init__(self, backend: str, out_size: int, model_dir: str, steps: int, threads: int, num_gpus: float):
        torch.set_num_threads(threads)
        self.resolver = SuperResolver(backend, out_size, model_dir, steps, device=pick_device(num_gpus))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _batch(prepare.super_resolve(_rows(batch), self.resolver))


class Mask:
    def __init__(self, backend: str, sam_dir: str, threads: int, num_gpus: float):
        torch.set_num_threads(threads)
        self.masker = BoxMasker(backend, sam_dir, device=pick_device(num_gpus))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _batch([prepare.add_masks(r, self.masker) for r in _rows(batch)])


def write(batch: pa.Table, output: str) -> pa.Table:
    """Write one part (records + errors, then its done marker); return its stats as one row."""
    from storygpt.data import parts

    rows = _rows(batch)
    records, errors, stats = prepare.to_tables(rows)
    name = parts.write_part(output, [r["id"] for r in rows], {"records": records, "errors": errors}, stats)
    return pa.Table.from_pylist([{"part": name, **stats, "finished_at": time.time()}])
