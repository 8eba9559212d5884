"""Writing a file or a directory so that no reader ever sees half of it.

Exports, trained evaluation models, zoo parts, record parts and their done markers are read by
later steps (and by other processes) as soon as they exist; a crash mid-write must leave the
previous good version, or none, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def replace_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(staging)`` into a hidden sibling of ``target``, then rename it into place. An
    existing ``target`` is swapped out whole (renames, no copy) and then deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = target.with_name(f".{target.name}.{tag}.partial")
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.{tag}.old")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    return target


def replace_file(target: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(staging)`` to a hidden ``.tmp`` sibling of ``target``, then rename it into place
    (atomic on POSIX). Readers that list a folder skip the hidden ``.tmp`` names."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(staging)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, target)
    return target


def replace_bytes(target: str | Path, data: bytes) -> Path:
    return replace_file(target, lambda staging: staging.write_bytes(data))
