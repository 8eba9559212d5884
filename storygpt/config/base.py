"""What every config section shares: the error type and a strict, frozen base model.

Its own module so that every section module can import it without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A bad configuration: the message names the dotted key and what was expected."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ordered(section: Section, low: str, high: str) -> Section:
    """Autoscaling bounds: ``low`` must not exceed ``high`` (a validator's body)."""
    if getattr(section, low) > getattr(section, high):
        raise ValueError(f"{low} ({getattr(section, low)}) must be <= {high} ({getattr(section, high)})")
    return section
