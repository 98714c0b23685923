"""Quantization sensitivity: how much the images change when only one part of the denoiser is quantized.

For each *unit* — a module path of the denoiser (a block), or ``"rest"`` (every quantizable layer
outside the listed units) — :func:`quantization_sensitivity` quantizes that unit alone, once its
weights (``weight_bits``, activations at 16) and once its activations (``activation_bits``, weights at
16), runs the pipeline on the samples, and records the PSNR of the images against the unquantized
pipeline's (simulated backend: the quality a real kernel would give). A lower PSNR is a more
sensitive unit. The ``quant`` space seeds its search from this ranking.

Results are cached on disk (``<difftune cache>/sensitivity``, one JSON file per model fingerprint,
units, bit-widths, samples and call), so a second study of the same model measures nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.errors import EvaluationError

from .calibration import Sample, check_call_kwargs, generate
from .quality import psnr_per_image
from .reference import default_cache_dir

__all__ = ["REST", "Sensitivity", "quantization_sensitivity"]

#: The unit name of every quantizable layer outside the listed units.
REST = "rest"
_FORMAT = "difftune-sensitivity/1"


@dataclass(frozen=True)
class Sensitivity:
    """Per unit, the PSNR (dB) against the unquantized images with only that unit's weights
    (``weights``) or only its activations (``activations``) quantized."""

    units: tuple[str, ...]
    weights: Mapping[str, float]
    activations: Mapping[str, float]
    weight_bits: int
    activation_bits: int
    from_cache: bool = False

    def ranked(self, kind: str = "weights") -> list[str]:
        """Units from the least sensitive (highest PSNR) to the most."""
        table = self.weights if kind == "weights" else self.activations
        return sorted(self.units, key=lambda u: (-table[u], self.units.index(u)))


def _config(unit: str, units: Sequence[str], weight_bits: int, activation_bits: int) -> Any:
    from difftune.accel.quant import QuantConfig, QuantSpec

    spec = QuantSpec(weight_bits=weight_bits, activation_bits=activation_bits)
    if unit == REST:
        return QuantConfig(default=spec, layers={u: QuantSpec() for u in units if u != REST})
    return QuantConfig(layers={unit: spec})


def quantization_sensitivity(
    pipe: Any,
    units: Sequence[str],
    samples: Sequence[Sample],
    *,
    call_kwargs: Mapping[str, Any] | None = None,
    weight_bits: int = 4,
    activation_bits: int = 8,
    cache_dir: str | Path | None = None,
) -> Sensitivity:
    """Measure (or load) the sensitivity of each of ``units`` (module paths, and/or :data:`REST`).

    Raises:
        EvaluationError: no samples, no units, or the pipeline produced NaN.
    """
    from difftune.models import describe

    if not samples:
        raise EvaluationError("quantization_sensitivity: no samples given")
    if not units:
        raise EvaluationError("quantization_sensitivity: no units given")
    kwargs = check_call_kwargs(call_kwargs or {})
    info = describe(pipe)
    key = json.dumps(
        {
            "format": _FORMAT,
            "fingerprint": info.fingerprint,
            "units": list(units),
            "bits": [weight_bits, activation_bits],
            "samples": [[type(s.condition).__name__, s.condition, s.seed] for s in samples],
            "call": {k: repr(v) for k, v in sorted(kwargs.items())},
        },
        sort_keys=True,
    )
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir().parent / "sensitivity"
    path = root / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return Sensitivity(
                    tuple(units), data["weights"], data["activations"], weight_bits, activation_bits, from_cache=True
                )
        except (OSError, ValueError, KeyError):
            pass
    plain = generate(pipe, list(samples), kwargs)
    tables: dict[str, dict[str, float]] = {"weights": {}, "activations": {}}
    for unit in units:
        for kind, bits in (("weights", (weight_bits, 16)), ("activations", (16, activation_bits))):
            handle = _config(unit, units, *bits).apply(pipe)
            try:
                images = generate(pipe, list(samples), kwargs)
            finally:
                handle.remove()
            value = float(psnr_per_image(images, plain).mean())
            if value != value:
                raise EvaluationError(f"quantization_sensitivity: NaN quantizing {unit} ({kind})")
            tables[kind][unit] = value
    from difftune._atomic import atomic_write

    text = json.dumps({"key": key, **tables}, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return Sensitivity(tuple(units), tables["weights"], tables["activations"], weight_bits, activation_bits)
