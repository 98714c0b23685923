"""Quality tiers: several exported profiles of one model in one bundle, switched per request.

A server keeps one pipeline loaded and serves requests at different speed / quality trade-offs:

>>> import difftune
>>> pipe = difftune.load_pipeline("embedded")
>>> tiers = difftune.load_tiers("tiers.json")        # {"lossless": …, "balanced": …, "fast": …}
>>> switch = difftune.TierSwitch(pipe, tiers)       # checks every tier's model against the pipeline
>>> switch.use("fast")                              # removes the active tier's hooks, applies this one's
>>> images = pipe(prompt=["digit 3"], **switch.call_kwargs()).images
>>> switch.use(None)                                # the plain pipeline, exactly as before

``difftune tiers --study S --tier fast="fastest where psnr>=28" --tier lossless="best psnr" --out
tiers.json`` writes a bundle: each tier is an export (re-measured on held-out samples, as
``difftune export`` does). Switching costs what removing one profile's hooks and applying another's
cost (``difftune bench runtime`` measures it against a pipeline call); profiles with a
quantization section re-quantize the weights on every switch to them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.errors import ProfileError
from difftune.profile import Profile, ProfileHandle, apply_profile

__all__ = ["BUNDLE_KIND", "TierBundle", "TierSwitch", "load_tiers"]

#: The ``kind`` of a tier bundle file.
BUNDLE_KIND = "difftune-tiers"
_VERSION = 1


@dataclass(frozen=True)
class TierBundle:
    """Named profiles of one model, in the order they were given (e.g. slowest and best first)."""

    tiers: Mapping[str, Profile] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ProfileError("tiers: a bundle needs at least one tier")
        for name in self.tiers:
            if not isinstance(name, str) or not name.strip():
                raise ProfileError(f"tiers: a tier name must be a non-empty string, got {name!r}")
        models = {(p.model.family, p.model.fingerprint) for p in self.tiers.values()}
        if len(models) > 1:
            listed = ", ".join(f"{n}: {p.model.name} ({p.model.fingerprint})" for n, p in self.tiers.items())
            raise ProfileError(f"tiers: every tier must be for the same model weights, got {listed}")

    @property
    def names(self) -> list[str]:
        return list(self.tiers)

    def __getitem__(self, name: str) -> Profile:
        try:
            return self.tiers[name]
        except KeyError:
            raise ProfileError(f"no tier {name!r}; this bundle has {', '.join(self.tiers)}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": BUNDLE_KIND,
            "version": _VERSION,
            "tiers": {name: profile.to_dict() for name, profile in self.tiers.items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> TierBundle:
        if not isinstance(data, Mapping) or data.get("kind") != BUNDLE_KIND:
            raise ProfileError(f"a tier bundle is a JSON object with kind {BUNDLE_KIND!r}")
        unknown = sorted(set(data) - {"kind", "version", "tiers"})
        if unknown:
            raise ProfileError(f"tier bundle: unknown key(s) {unknown}")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= _VERSION:
            raise ProfileError(f"tier bundle: version {version!r} is not one this difftune reads (1 … {_VERSION})")
        tiers = data.get("tiers")
        if not isinstance(tiers, Mapping):
            raise ProfileError(f"tier bundle: 'tiers' must map a tier name to a profile, got {tiers!r}")
        loaded = {}
        for name, profile in tiers.items():
            try:
                loaded[str(name)] = Profile.from_dict(profile)
            except ProfileError as exc:
                raise ProfileError(f"tier {name!r}: {exc}") from None
        return cls(loaded)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the bundle as JSON atomically (never half a file)."""
        from difftune._atomic import atomic_write

        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load_tiers(source: str | os.PathLike[str] | Mapping[str, Any]) -> TierBundle:
    """Read and validate a tier bundle (a path to JSON, or a parsed dict); :class:`ProfileError` names
    what is wrong (the tier and the field)."""
    if isinstance(source, Mapping):
        return TierBundle.from_dict(source)
    path = Path(source)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"no tier bundle at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"cannot read the tier bundle {path}: {exc}") from None
    try:
        return TierBundle.from_dict(data)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from None


class TierSwitch:
    """Switch one loaded pipeline between a bundle's tiers.

    Every tier is checked against the pipeline when the switch is made (its model's family and
    weights, as :func:`~difftune.apply_profile` checks them), so a wrong bundle fails at start-up,
    not on a request. Not thread-safe: a server that runs requests concurrently on one pipeline
    needs one pipeline per tier, or a lock around ``use`` and the call.
    """

    def __init__(self, pipe: Any, bundle: TierBundle | str | os.PathLike[str] | Mapping[str, Any]) -> None:
        from difftune.models import describe

        self.pipe = pipe
        self.bundle = bundle if isinstance(bundle, TierBundle) else load_tiers(bundle)
        info = describe(pipe)
        for name, profile in self.bundle.tiers.items():
            if (profile.model.family, profile.model.fingerprint) != (info.family, info.fingerprint):
                raise ProfileError(
                    f"tier {name!r} was tuned for {profile.model.name} ({profile.model.family}, "
                    f"{profile.model.fingerprint}); this pipeline is {info.family} ({info.fingerprint})"
                )
        self._active: tuple[str, ProfileHandle] | None = None

    @property
    def current(self) -> str | None:
        """The active tier's name; None: the plain pipeline."""
        return None if self._active is None else self._active[0]

    def use(self, name: str | None) -> str | None:
        """Make ``name`` the active tier (None: no tier); a no-op when it already is. Returns the previous one.

        The previous tier's hooks are removed before the new ones are applied; if applying fails,
        the pipeline is left plain (no tier) and the error propagates.
        """
        previous = self.current
        if name == previous:
            return previous
        profile = None if name is None else self.bundle[name]
        if self._active is not None:
            self._active[1].remove()
            self._active = None
        if profile is not None:
            self._active = (str(name), apply_profile(self.pipe, profile))
        return previous

    def call_kwargs(self, name: str | None = None) -> dict[str, Any]:
        """What the pipeline call needs for tier ``name`` (default: the active one): its steps, and the
        guidance / size it was tuned for where the profile says."""
        tier = name if name is not None else self.current
        if tier is None:
            return {}
        context = self.bundle[tier].context
        out: dict[str, Any] = {"num_inference_steps": context.num_inference_steps}
        for key in ("guidance_scale", "height", "width"):
            value = getattr(context, key)
            if value is not None:
                out[key] = value
        return out

    def close(self) -> None:
        """Remove the active tier: the pipeline is exactly as before the switch was made."""
        self.use(None)
