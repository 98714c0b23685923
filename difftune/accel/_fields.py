"""Validation of profile fields: every error names the field, the value and what was expected."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from difftune.errors import ProfileError


def require(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ProfileError(f"{where}.{key}: missing")
    return data[key]


def as_int(value: Any, where: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(f"{where}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ProfileError(f"{where}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ProfileError(f"{where}: must be <= {maximum}, got {value}")
    return value


def as_float(value: Any, where: str, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ProfileError(f"{where}: expected a finite number, got {value!r}")
    if value in (float("inf"), float("-inf")):
        raise ProfileError(f"{where}: expected a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ProfileError(f"{where}: must be >= {minimum}, got {value}")
    return float(value)


def as_str(value: Any, where: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise ProfileError(f"{where}: expected a string, got {value!r}")
    if choices is not None and value not in choices:
        raise ProfileError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ProfileError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}"
        )
