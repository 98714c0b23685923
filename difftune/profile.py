"""Deployable profiles: the JSON a search exports and a serving stack applies in two lines.

>>> import difftune
>>> pipe = difftune.load_pipeline("embedded")
>>> profile = difftune.load_profile("profile.json")      # validates; never executes code
>>> handle = difftune.apply_profile(pipe, profile)       # checks the model fingerprint
>>> images = pipe(prompt=["digit 3"] * 4, num_inference_steps=profile.context.num_inference_steps).images
>>> handle.remove()                                      # the pipeline is exactly as before
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.accel._fields import as_float, as_int, as_str, check_keys, require
from difftune.accel._hooks import CompositeHandle
from difftune.accel._registry import SECTIONS, config_from_dict
from difftune.errors import ProfileError

__all__ = [
    "FAMILIES",
    "SCHEMA_VERSION",
    "ModelRef",
    "Profile",
    "ProfileContext",
    "ProfileHandle",
    "apply_profile",
    "load_profile",
]

#: Version of the profile format this difftune writes and the newest it reads.
SCHEMA_VERSION = 1
FAMILIES = ("embedded", "dit", "pixart", "sd", "sdxl", "sd3", "flux")


@dataclass(frozen=True)
class ModelRef:
    """The model a profile was tuned on; ``fingerprint`` is :func:`difftune.describe`'s weight hash."""

    name: str
    family: str
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Any) -> ModelRef:
        if not isinstance(data, Mapping):
            raise ProfileError(f"model: expected an object, got {data!r}")
        check_keys(data, {"name", "family", "fingerprint"}, "model")
        return cls(
            name=as_str(require(data, "name", "model"), "model.name"),
            family=as_str(require(data, "family", "model"), "model.family", FAMILIES),
            fingerprint=as_str(require(data, "fingerprint", "model"), "model.fingerprint"),
        )


@dataclass(frozen=True)
class ProfileContext:
    """The call a profile was tuned for; ``None`` means "whatever the pipeline uses"."""

    num_inference_steps: int
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ProfileContext:
        if not isinstance(data, Mapping):
            raise ProfileError(f"context: expected an object, got {data!r}")
        check_keys(data, {"num_inference_steps", "guidance_scale", "height", "width", "batch_size"}, "context")

        def optional_int(key: str) -> int | None:
            value = data.get(key)
            return None if value is None else as_int(value, f"context.{key}", minimum=1)

        guidance = data.get("guidance_scale")
        return cls(
            num_inference_steps=as_int(
                require(data, "num_inference_steps", "context"), "context.num_inference_steps", minimum=1
            ),
            guidance_scale=None if guidance is None else as_float(guidance, "context.guidance_scale", minimum=0.0),
            height=optional_int("height"),
            width=optional_int("width"),
            batch_size=optional_int("batch_size"),
        )


def _check_metrics(data: Any) -> dict[str, dict[str, Any]]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ProfileError(f"metrics: expected an object of name -> {{value, unit}}, got {data!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, metric in data.items():
        if not isinstance(metric, Mapping):
            raise ProfileError(f"metrics.{name}: expected an object with 'value' and 'unit', got {metric!r}")
        value = require(metric, "value", f"metrics.{name}")
        if value is not None:
            as_float(value, f"metrics.{name}.value")
        as_str(require(metric, "unit", f"metrics.{name}"), f"metrics.{name}.unit")
        out[str(name)] = dict(metric)
    return out


def _plain_json(value: Any, where: str) -> Any:
    """Provenance and metrics hold only JSON values: no objects that could run code on load."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _plain_json(v, f"{where}.{k}") for k, v in value.items()}
    raise ProfileError(f"{where}: {type(value).__name__} is not a JSON value")


@dataclass(frozen=True)
class Profile:
    """A deployable acceleration setting for one model and call context.

    The four technique sections are the registered configs of :mod:`difftune.accel` (or ``None``):
    ``solver`` (USF schedule), ``cache`` (mask or named policy), ``sparsity`` (SADA) and
    ``quantization`` (per-layer bits). ``metrics`` maps a metric name to ``{"value", "unit", …}``.
    """

    name: str
    model: ModelRef
    context: ProfileContext
    solver: Any = None
    cache: Any = None
    sparsity: Any = None
    quantization: Any = None
    metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "name": self.name,
            "model": self.model.to_dict(),
            "context": self.context.to_dict(),
        }
        for section in ("solver", "cache", "sparsity", "quantization"):
            config = getattr(self, section)
            out[section] = None if config is None else config.to_dict()
        out["metrics"] = _plain_json(dict(self.metrics), "metrics")
        out["provenance"] = _plain_json(dict(self.provenance), "provenance")
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        if not isinstance(data, Mapping):
            raise ProfileError(f"a profile is a JSON object, got {type(data).__name__}")
        check_keys(
            data,
            {"schema_version", "name", "model", "context", *SECTIONS, "metrics", "provenance"},
            "profile",
        )
        version = as_int(require(data, "schema_version", "profile"), "schema_version", minimum=1)
        if version > SCHEMA_VERSION:
            raise ProfileError(
                f"schema_version {version} is newer than this difftune understands ({SCHEMA_VERSION}): "
                "upgrade difftune to read this profile"
            )
        sections = {s: None if data.get(s) is None else config_from_dict(s, data[s]) for s in SECTIONS}
        context = ProfileContext.from_dict(require(data, "context", "profile"))
        for section, config in sections.items():
            steps = getattr(config, "num_steps", None)
            if steps is not None and steps != context.num_inference_steps:
                raise ProfileError(
                    f"{section}: has {steps} steps but context.num_inference_steps is {context.num_inference_steps}"
                )
        provenance = data.get("provenance") or {}
        if not isinstance(provenance, Mapping):
            raise ProfileError(f"provenance: expected an object, got {provenance!r}")
        return cls(
            name=as_str(require(data, "name", "profile"), "name"),
            model=ModelRef.from_dict(require(data, "model", "profile")),
            context=context,
            metrics=_check_metrics(data.get("metrics")),
            provenance=_plain_json(provenance, "provenance"),
            schema_version=version,
            **sections,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON atomically (temporary file + rename): never half a file."""
        from difftune._atomic import atomic_write

        text = self.to_json()
        return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load_profile(source: str | os.PathLike[str] | Mapping[str, Any]) -> Profile:
    """Read and validate a profile (a path to JSON, or an already-parsed dict).

    Raises:
        ProfileError: the file is missing, not JSON, or a field is wrong; the message names it.
    """
    if isinstance(source, Mapping):
        return Profile.from_dict(source)
    path = Path(source)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ProfileError(f"no profile at {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    try:
        return Profile.from_dict(data)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from exc


class ProfileHandle(CompositeHandle):
    """What :func:`apply_profile` returns; ``remove()`` restores the pipeline exactly."""

    def __init__(self, profile: Profile):
        super().__init__()
        self.profile = profile


def _mismatch(message: str, strict: bool) -> None:
    if strict:
        raise ProfileError(message + " (apply with strict=False to use it anyway)")
    warnings.warn(message, stacklevel=3)


def apply_profile(
    pipe: Any, profile: Profile | str | os.PathLike[str] | Mapping[str, Any], *, strict: bool = True
) -> ProfileHandle:
    """Apply every section of ``profile`` to ``pipe`` and return a handle that undoes them all.

    Sections apply in the order quantization, solver, sparsity, cache. With ``strict`` (default) a
    profile for another model (fingerprint or family) raises :class:`ProfileError`, and so does a
    pipeline call with another ``num_inference_steps`` than the profile's context; with
    ``strict=False`` these warn instead. If any section fails to apply, the ones already applied
    are undone before the error propagates.
    """
    from difftune.models import describe

    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    info = describe(pipe)
    if profile.model.family != info.family:
        _mismatch(f"this profile is for a {profile.model.family} model, the pipeline is {info.family}", strict)
    elif profile.model.fingerprint != info.fingerprint:
        _mismatch(
            f"this profile was tuned on other weights ({profile.model.name}, {profile.model.fingerprint}) than "
            f"this pipeline's ({info.fingerprint})",
            strict,
        )
    handle = ProfileHandle(profile)
    try:
        for section in SECTIONS:
            config = getattr(profile, section)
            if config is not None:
                handle.add(config.apply(pipe, strict=strict))
    except BaseException:
        handle.remove()
        raise
    return handle
