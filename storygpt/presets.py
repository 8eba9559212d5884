"""Where the bundled presets live, and finding one by name.

``configs/`` ships inside the package as ``storygpt/configs`` (package data, pyproject.toml), so an
installed wheel has them; a checkout reads ``configs/`` beside the package. ``--config tiny`` names
one; ``configs/tiny.yaml`` (relative, missing from the cwd) means the bundled one too, so commands
work from any directory: a `ray job submit` working dir, an installed wheel.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def directory() -> Path:
    """``storygpt/configs`` in an installed wheel, else the checkout's ``configs/``."""
    packaged = PACKAGE / "configs"
    return packaged if packaged.is_dir() else PACKAGE.parent / "configs"


def names() -> list[str]:
    return sorted(p.stem for p in directory().glob("*.yaml"))


def find(name_or_path: str | Path) -> Path | None:
    """An existing path as given; else a bare name's bundled preset; else :func:`bundled`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    if "/" not in text and "\\" not in text:  # a bare name
        named = directory() / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
        if named.is_file():
            return named
    return bundled(path)


def bundled(path: Path) -> Path | None:
    """``configs/X`` (relative) as the bundled ``X``, if it exists."""
    if path.is_absolute() or len(path.parts) < 2 or path.parts[0] != "configs":
        return None
    candidate = directory().joinpath(*path.parts[1:])
    return candidate if candidate.is_file() else None
