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

from storygpt.atomic import replace_dir

CACHE_ENV = "STORYGPT_CACHE"


def cache_root() -> Path | None:
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "storygpt" / "zoo"


def build_digest(inputs: dict, sources: list[Path]) -> str:
    """sha256 of ``inputs`` (JSON) and the bytes of ``sources``: one per build; a part's key
    is ``<part>-<digest>``."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode())
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:20]


def has(key: str) -> bool:
    root = cache_root()
    return root is not None and (root / key).is_dir()


def fetch(key: str, dest: Path) -> bool:
    """Copy the cached part to ``dest``; False when it is not cached (or the cache is off)."""
    root = cache_root()
    if root is None or not (root / key).is_dir():
        return False
    shutil.copytree(root / key, dest)
    return True


def store(key: str, built: Path) -> None:
    """Add a built part, written whole or not at all (:func:`storygpt.atomic.replace_dir`). A
    failure to cache (read-only home, full disk) costs only a rebuild."""
    root = cache_root()
    if root is None or (root / key).is_dir():
        return
    try:
        replace_dir(root / key, lambda staging: shutil.copytree(built, staging))
    except OSError:
        pass
