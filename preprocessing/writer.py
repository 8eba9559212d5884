"""Atomic, resumable output: ``records/``, ``errors/``, ``done/`` markers, ``manifest.json``.

A part is named after the ids it holds, written to a temp file and renamed into place, and
counted as done only once its marker exists. A crash leaves at worst unmarked files, which the
next run deletes before it starts; it then skips every id a marker lists. So a re-run finishes
the rest, and a retried task rewrites the same part instead of adding a duplicate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storygpt.atomic import replace_bytes, replace_file

KINDS = ("records", "errors")


def part_name(ids: list[str]) -> str:
    return "part-" + hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def atomic_parquet(table: pa.Table, path: Path) -> None:
    replace_file(path, lambda staging: pq.write_table(table, staging))


def write_part(output: Path, ids: list[str], records: pa.Table, errors: pa.Table, stats: dict) -> str:
    name = part_name(ids)
    for kind, table in zip(KINDS, (records, errors)):
        (output / kind).mkdir(parents=True, exist_ok=True)
        atomic_parquet(table, output / kind / f"{name}.parquet")
    (output / "done").mkdir(parents=True, exist_ok=True)
    replace_bytes(output / "done" / f"{name}.json", json.dumps({"ids": ids, **stats}).encode())
    return name


def resume_state(output: Path) -> tuple[set[str], list[dict]]:
    """(ids already done, their parts' stats); removes what a crashed run left unfinished."""
    markers = sorted((output / "done").glob("*.json")) if (output / "done").is_dir() else []
    done_parts = {m.stem for m in markers}
    for kind in KINDS:
        folder = output / kind
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.endswith(".tmp") or (path.name.startswith("part-") and path.stem not in done_parts):
                path.unlink()  # an unmarked part: its frames are processed again
    ids: set[str] = set()
    stats = []
    for marker in markers:
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
