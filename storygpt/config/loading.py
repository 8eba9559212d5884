"""From a preset name or path to a validated :class:`StoryConfig`: ``extends:`` chains, ``--set``
overrides, and validation errors rewritten to name the dotted key. Reads the schema, never the
other way round."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from storygpt import presets
from storygpt.config.base import ConfigError
from storygpt.config.story import StoryConfig

DEFAULT_PRESET = "tiny"


def find_config(name_or_path: str | Path) -> Path:
    """A preset file from a name (``tiny``, ``cluster-flintstones``) or a path. An existing path
    wins; a relative ``configs/...`` path missing from the cwd is read from the bundled presets."""
    found = presets.find(name_or_path)
    if found is None:
        raise ConfigError(f"--config: no preset file '{name_or_path}' (a path, or one of the bundled presets: "
                          f"{', '.join(presets.names())})")
    return found


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> StoryConfig:
    """The preset ``path`` (a file or a bundled preset's name; None: ``tiny``) with ``--set`` overrides."""
    path = find_config(DEFAULT_PRESET if path is None else path)
    raw = _read_preset(path, seen=())
    for item in overrides:
        _apply_override(raw, item)
    try:
        return StoryConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source=str(path))) from None


def _read_preset(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: '{path}'")
    if path.resolve() in seen:
        raise ConfigError(f"extends: cycle through '{path}'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _read_preset(path.parent / parent, seen + (path.resolve(),))
    return _merge(base, data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {key}: '{where}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check spelling; see storygpt/config/)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required, missing")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)
