"""Writing a directory so that no reader ever sees half of it.

Exports, trained evaluation models and zoo parts are read by later steps (and by other
processes) as soon as they exist; a crash mid-write must leave the previous good directory, or
none, never a half-written one.
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
