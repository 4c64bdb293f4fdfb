"""Mode arguments as ``(str, Enum)`` members, as anomalib's own (``TaskType``, ``LearningType``)."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

Mode = TypeVar("Mode", bound=Enum)


def parse_option(kind: type[Mode], value: Mode | str, name: str) -> Mode:
    """``value`` as a member of ``kind`` (a ``(str, Enum)``), or an error that names ``name`` and lists the choices.

    Raises:
        ValueError: ``value`` is none of ``kind``'s values.
    """
    try:
        return kind(value)
    except ValueError:
        msg = f"Unknown {name} '{value}'. Choose one of {[member.value for member in kind]}."
        raise ValueError(msg) from None
