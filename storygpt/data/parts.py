"""The resumable-parts store: how ``preprocess`` and ``precompute`` write their output so that a
crash loses at most the parts in flight, and how every reader sees finished parts only.

    {root}/{kind}/part-<hash>.parquet   one file per kind of a part (records + errors; targets)
    {root}/done/part-<hash>.json        its done marker: the ids it holds and its stats

A part is named after the ids it holds (a retried task rewrites the same part, never adds a
second), each file is written under a hidden temp name and renamed into place, and the marker
is written last: a part is finished once its marker exists, and not before. Readers take the
files :func:`finished_files` lists (Ray Data included: ``ray.data.read_parquet(list)``), never a
bare folder, so what a crashed writer left (an unmarked part, a ``.tmp``) is never read;
:func:`resume` deletes it and says which ids are done. A file of another name in a kind's folder
is a whole file the driver writes in one rename (:func:`write_whole`: the reader's errors).
No Ray here: the Ray jobs call it from their tasks and drivers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storygpt.atomic import replace_bytes, replace_file

DONE = "done"  # {root}/done/<part>.json
PREFIX = "part-"


def part_name(ids: Iterable[str]) -> str:
    """The part's name, from the ids it holds (in any order)."""
    return PREFIX + hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    """One Parquet file, all or nothing (:func:`storygpt.atomic.replace_file`)."""
    return replace_file(path, lambda staging: pq.write_table(table, staging))


def write_part(root: str | Path, ids: list[str], tables: Mapping[str, pa.Table], stats: Mapping | None = None) -> str:
    """Write one part: ``tables[kind]`` to ``{root}/{kind}/``, then its done marker (``ids`` +
    ``stats``). Returns the part's name."""
    root, name = Path(root), part_name(ids)
    for kind, table in tables.items():
        (root / kind).mkdir(parents=True, exist_ok=True)
        write_parquet(table, root / kind / f"{name}.parquet")
    (root / DONE).mkdir(parents=True, exist_ok=True)
    replace_bytes(root / DONE / f"{name}.json", json.dumps({"ids": list(ids), **(stats or {})}).encode())
    return name


def write_whole(root: str | Path, kind: str, name: str, table: pa.Table) -> Path:
    """A file of ``kind`` that is not a part (no marker, never resumed: the driver rewrites it
    each run), e.g. the reader's errors; readers see it beside the finished parts."""
    if name.startswith(PREFIX):
        raise ValueError(f"'{name}': a whole file's name must not start with '{PREFIX}' (the parts' names)")
    (Path(root) / kind).mkdir(parents=True, exist_ok=True)
    return write_parquet(table, Path(root) / kind / f"{name}.parquet")


def _markers(root: Path) -> list[Path]:
    return sorted((root / DONE).glob(f"{PREFIX}*.json")) if (root / DONE).is_dir() else []


def finished_parts(root: str | Path) -> set[str]:
    """The names of the parts whose done marker exists."""
    return {m.stem for m in _markers(Path(root))}


def finished_files(root: str | Path, kind: str) -> list[str]:
    """The readable files of ``{root}/{kind}/``, sorted: each finished part's file, and whole files.
    A part without its marker is left out (a crashed or a running writer's)."""
    folder, finished = Path(root) / kind, finished_parts(root)
    if not folder.is_dir():
        return []
    return [str(f) for f in sorted(folder.glob("*.parquet"))
            if not f.name.startswith(".") and (f.stem in finished or not f.stem.startswith(PREFIX))]


def unfinished_parts(root: str | Path, kind: str) -> list[str]:
    """The names of the parts of ``kind`` on disk without a done marker."""
    folder, finished = Path(root) / kind, finished_parts(root)
    if not folder.is_dir():
        return []
    return sorted(f.stem for f in folder.glob(f"{PREFIX}*.parquet") if f.stem not in finished)


def tables(root: str | Path, kind: str, schema: pa.Schema, columns: list[str] | None = None,
           filters: list | None = None) -> Iterator[pa.Table]:
    """The finished files of ``kind``, one table each, in ``schema``; ``filters`` as
    :func:`pyarrow.parquet.read_table` takes them. One file in memory at a time."""
    for f in finished_files(root, kind):
        yield pq.read_table(f, columns=columns, schema=schema, filters=filters)


def read(root: str | Path, kind: str, schema: pa.Schema, columns: list[str] | None = None,
         filters: list | None = None) -> pa.Table:
    """:func:`tables` as one table (empty with ``schema`` if there is no finished file)."""
    found = list(tables(root, kind, schema, columns, filters))
    if not found:
        return schema.empty_table().select(columns) if columns else schema.empty_table()
    return pa.concat_tables(found)


def resume(root: str | Path, kinds: Iterable[str]) -> tuple[set[str], list[dict]]:
    """Before a (re-)run: delete what a crashed one left in ``kinds`` (temp files, parts without
    a marker: their ids are done again), and return (ids already done, each finished part's stats)."""
    root = Path(root)
    finished = finished_parts(root)
    for kind in kinds:
        folder = root / kind
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.endswith(".tmp") or (path.name.startswith(PREFIX) and path.stem not in finished):
                path.unlink()
    ids: set[str] = set()
    stats = []
    for marker in _markers(root):
        info = json.loads(marker.read_text())
        ids.update(info.pop("ids"))
        stats.append(info)
    return ids, stats


def require_same_settings(path: Path, settings: dict, key: str, what: str, remedy: str) -> None:
    """An output dir may only be resumed with the settings it was started with: the first run
    writes ``settings`` to ``path``; a later one with any differing key raises naming them."""
    from storygpt.config import ConfigError

    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise ConfigError(f"{key}: '{path.parent}' holds {what} made with other settings "
                              f"({', '.join(changed)}); {remedy}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_bytes(path, json.dumps(settings, indent=1).encode())  # a torn file would refuse every re-run
