"""The registry of technique configs: one per (profile section, kind), filled by a decorator."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from difftune.errors import ProfileError

__all__ = ["SECTIONS", "config_from_dict", "register_technique", "techniques"]

SECTIONS = ("quantization", "solver", "sparsity", "cache")  # also the order apply_profile applies them in
_REGISTRY: dict[str, dict[str, type]] = {s: {} for s in SECTIONS}
#: The kind a section's dict means when it has no "kind" key (INTERFACE.md's quantization example has none).
_DEFAULT_KIND: dict[str, str] = {"quantization": "bits"}

T = TypeVar("T", bound=type)


def register_technique(section: str, kind: str) -> Callable[[T], T]:
    """Class decorator: the config class for ``{"kind": kind}`` in profile section ``section``.

    The class provides ``from_dict(data)``, ``to_dict()`` and ``apply(pipe, *, strict=True)`` returning
    a handle with ``remove()``.
    """
    if section not in _REGISTRY:
        raise ValueError(f"unknown profile section {section!r}; sections: {', '.join(SECTIONS)}")

    def decorate(cls: T) -> T:
        if kind in _REGISTRY[section]:
            raise ValueError(f"{section} kind {kind!r} is already registered")
        _REGISTRY[section][kind] = cls
        cls.section = section  # type: ignore[attr-defined]
        cls.kind = kind  # type: ignore[attr-defined]
        return cls

    return decorate


def techniques() -> dict[str, tuple[str, ...]]:
    """The registered kinds of every section."""
    _load_all()
    return {s: tuple(sorted(k)) for s, k in _REGISTRY.items()}


_TECHNIQUE_MODULES = (
    "difftune.accel.cache",
    "difftune.accel.solver",
    "difftune.accel.deepcache",
    "difftune.accel.delta_dit",
    "difftune.accel.first_block_cache",
    "difftune.accel.taylorseer",
    "difftune.accel.quant",
    "difftune.accel.sada",
)


def _load_all() -> None:
    import importlib

    for name in _TECHNIQUE_MODULES:
        importlib.import_module(name)


def config_from_dict(section: str, data: Any) -> Any:
    """Build the registered config for one profile section, with an error naming the bad field."""
    _load_all()
    if not isinstance(data, Mapping):
        raise ProfileError(f"{section}: expected an object or null, got {type(data).__name__}")
    kind = data.get("kind", _DEFAULT_KIND.get(section))
    cls = _REGISTRY[section].get(kind) if isinstance(kind, str) else None
    if cls is None:
        known = ", ".join(sorted(_REGISTRY[section])) or "none yet"
        raise ProfileError(f"{section}.kind: unknown kind {kind!r}; known kinds: {known}")
    return cls.from_dict(data)  # type: ignore[attr-defined]
