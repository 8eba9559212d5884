"""A content-addressed cache of built zoo parts, so a part that takes training (the VAE, the
language models) is built once per machine and copied afterwards.

A part's key hashes everything its bytes depend on: the part's name, the zoo sizes, the corpus,
the seed, the library versions and the source of the modules that build it. Changing any of
them builds afresh; nothing has to be invalidated by hand. ``STORYGPT_CACHE`` names the cache
directory (default ``~/.cache/storygpt/zoo``); ``STORYGPT_CACHE=off`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

CACHE_ENV = "STORYGPT_CACHE"


def cache_root() -> Path | None:
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "storygpt" / "zoo"


def part_key(part: str, inputs: dict, sources: list[Path]) -> str:
    """``part``-<sha256 of inputs (JSON) and the bytes of ``sources``>."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode())
    for source in sources:
        digest.update(source.read_bytes())
    return f"{part}-{digest.hexdigest()[:20]}"


def fetch(key: str, dest: Path) -> bool:
    """Copy the cached part to ``dest``; False when it is not cached (or the cache is off)."""
    root = cache_root()
    if root is None or not (root / key).is_dir():
        return False
    shutil.copytree(root / key, dest)
    return True


def store(key: str, built: Path) -> None:
    """Add a built part: copied beside the cache entry, then renamed into place, so a reader
    never sees half an entry. A failure to cache (read-only home, full disk) costs only a rebuild."""
    root = cache_root()
    if root is None or (root / key).is_dir():
        return
    staging = root / f".{key}.{os.getpid()}.partial"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(built, staging)
        staging.rename(root / key)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
