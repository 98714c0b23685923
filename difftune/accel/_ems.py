"""DPM-Solver-v3's empirical model statistics (EMS), as a solver schedule carries them.

DPM-Solver-v3 (Zheng, Lu, Chen, Zhu, NeurIPS 2023; the update as thu-nics/USF ``uni_sampler.py``
runs it) rewrites the diffusion ODE with three per-element coefficients of λ = log(α/σ):

- ``l``: the linear part of σ·ε̂ in x (the diagonal of σ·∇ₓε̂ on average), so that
  f = (σ·ε̂ − l·x)/α varies slowly;
- ``s`` and ``b``: the best affine predictor f′ ≈ s·f + b of f's λ-derivative along trajectories,
  so that g = e^{−∫s}·f − ∫e^{−∫s}·b is nearly constant and a low-order Taylor expansion of g is
  accurate.

With L = ∫l, S = ∫s, I = ∫e^{L+S}, B = ∫e^{−S}·b, C = ∫e^{L+S}·B (cumulative trapezoid integrals
from the noisiest point of a λ-uniform grid, the reference's ``weighted_cumsumexp_trapezoid``), the
step from s to t is

    x_t = α_t/α_s·e^{L_s−L_t}·x_s − α_t·e^{−L_t−S_s}·(I_t − I_s)·g_s − α_t·e^{−L_t}·(C_t − C_s − B_s·(I_t − I_s))
          − Σ_k α_t·e^{L_s−L_t}·∫_s^t e^{L+S−L_s−S_s}·(λ−λ_s)^k/k! dλ · g⁽ᵏ⁾,

with g_j = e^{S_s−S_j}·f_j − e^{S_s}·(B_j − B_s) for the buffered evaluations. ``l = 1, s = b = 0``
gives DPM-Solver++ (f = −x̂₀).

:class:`EMS` holds l, s, b on their λ grid (computed by :func:`difftune.search.ems.compute_ems`);
:class:`EMSTable` holds what one schedule needs — the cumulative integrals at its points, snapped to
the nearest grid index as the reference does, and its steps' high-order coefficients — so a profile
carries its statistics and applies without the grid. Arrays are stored in the profile as base64 of
little-endian float64 (never pickle).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from difftune.errors import ProfileError

__all__ = ["EMS", "EMSTable", "StoredArray", "cumulative_exp_trapezoid", "decode_array", "encode_array"]

#: Highest Taylor order of a v3 step's g (the scheduler's MAX_ORDER − 1 derivatives).
HIGH_ORDERS = 3
_ROWS = ("l", "L", "S", "B", "I", "C")


def cumulative_exp_trapezoid(a: np.ndarray, x: np.ndarray, b: np.ndarray | None, cumsum: bool = True) -> np.ndarray:
    """∫ b·e^a dx by the trapezoid rule along axis 0, from the first point (0 there); ``cumsum=False``: the total.

    The reference's ``weighted_cumsumexp_trapezoid``: the exponent's maximum is factored out for range.
    """
    a_max = np.amax(a, axis=0, keepdims=True)
    tmp = np.exp(a - a_max) if b is None else b * np.exp(a - a_max)
    out = 0.5 * (x[1:] - x[:-1]) * (tmp[1:] + tmp[:-1])
    if not cumsum:
        return np.sum(out, axis=0) * np.exp(a_max[0])
    out = np.cumsum(out, axis=0) * np.exp(a_max)
    return np.concatenate([np.zeros_like(out[:1]), out], axis=0)


def encode_array(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype="<f8")
    return {"shape": list(data.shape), "float64": base64.b64encode(data.tobytes()).decode("ascii")}


def decode_array(data: Any, where: str) -> np.ndarray:
    if not isinstance(data, Mapping) or set(data) != {"shape", "float64"}:
        raise ProfileError(f"{where}: expected {{'shape': [...], 'float64': '<base64>'}}, got {str(data)[:80]!r}")
    shape = data["shape"]
    if not isinstance(shape, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise ProfileError(f"{where}.shape: expected a list of positive integers, got {shape!r}")
    try:
        raw = base64.b64decode(str(data["float64"]), validate=True)
    except (ValueError, TypeError) as exc:
        raise ProfileError(f"{where}.float64: not base64 ({exc})") from None
    if len(raw) != 8 * math.prod(shape):
        raise ProfileError(f"{where}: {len(raw)} bytes for shape {shape} (expected {8 * math.prod(shape)})")
    return np.frombuffer(raw, dtype="<f8").reshape(shape).astype(np.float64)


@dataclass(frozen=True, eq=False)
class StoredArray:
    """A float64 array a profile carries (base64, never pickle), compared by value."""

    array: np.ndarray

    def __post_init__(self) -> None:
        array = np.asarray(self.array, dtype=np.float64)
        if not np.all(np.isfinite(array)):
            raise ProfileError("array: holds NaN or inf")
        object.__setattr__(self, "array", array)

    def to_dict(self) -> dict[str, Any]:
        return encode_array(self.array)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> StoredArray:
        array = decode_array(data, where)
        if not np.all(np.isfinite(array)):
            raise ProfileError(f"{where}: holds NaN or inf")
        return cls(array)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoredArray) and np.array_equal(self.array, other.array)

    def __hash__(self) -> int:
        return hash((self.array.shape, self.array.tobytes()))


@dataclass(frozen=True, eq=False)
class EMS:
    """l, s, b on a λ grid (increasing λ: from the noisiest point to the cleanest), per element of a sample.

    Attributes:
        lambdas: the grid, shape (N + 1,), uniform in λ as the reference's ``get_time_steps("logSNR")``.
        l, s, b: shape (N + 1, *sample shape without the batch).
        source: how they were computed (model fingerprint, guidance, samples, …), copied into tables.
        x0_mean: the mean clean sample of the same trajectories (the model's x̂₀ at the cleanest grid
            point), USF's ``average_x0`` for an analytical first step; None if not computed.
    """

    lambdas: np.ndarray
    l: np.ndarray  # noqa: E741 - the paper's and the reference's name
    s: np.ndarray
    b: np.ndarray
    source: Mapping[str, Any] = field(default_factory=dict)
    x0_mean: np.ndarray | None = None

    def __post_init__(self) -> None:
        lam = np.asarray(self.lambdas, dtype=np.float64)
        if lam.ndim != 1 or len(lam) < 2 or not np.all(np.isfinite(lam)) or np.any(np.diff(lam) <= 0):
            raise ProfileError("ems.lambdas: expected an increasing finite λ grid of at least two points")
        object.__setattr__(self, "lambdas", lam)
        for name in ("l", "s", "b"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape[:1] != lam.shape or value.ndim < 2:
                raise ProfileError(f"ems.{name}: shape {value.shape}; expected ({len(lam)}, *sample shape)")
            if not np.all(np.isfinite(value)):
                raise ProfileError(f"ems.{name}: holds NaN or inf; recompute the statistics")
            object.__setattr__(self, name, value)
        if not self.l.shape == self.s.shape == self.b.shape:
            raise ProfileError(f"ems: l, s, b shapes differ ({self.l.shape}, {self.s.shape}, {self.b.shape})")
        if self.x0_mean is not None:
            mean = np.asarray(self.x0_mean, dtype=np.float64)
            if mean.shape != self.l.shape[1:] or not np.all(np.isfinite(mean)):
                raise ProfileError(f"ems.x0_mean: shape {mean.shape} (expected {self.l.shape[1:]}) or not finite")
            object.__setattr__(self, "x0_mean", mean)
        ts = lam.reshape((-1,) + (1,) * (self.l.ndim - 1))
        zero, one = np.zeros_like(self.l), np.ones_like(self.l)
        L = cumulative_exp_trapezoid(zero, ts, self.l)
        S = cumulative_exp_trapezoid(zero, ts, self.s)
        integrals = {"L": L, "S": S, "I": cumulative_exp_trapezoid(L + S, ts, one)}
        integrals["B"] = cumulative_exp_trapezoid(-S, ts, self.b)
        integrals["C"] = cumulative_exp_trapezoid(L + S, ts, integrals["B"])
        object.__setattr__(self, "_integrals", integrals)
        object.__setattr__(self, "_ts", ts)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    @property
    def steps(self) -> int:
        return len(self.lambdas) - 1

    def index(self, lam: float) -> int | None:
        """The nearest grid index of λ (the reference's ``get_index`` rounding); None outside the grid."""
        if not math.isfinite(lam):
            return None
        lo, hi = float(self.lambdas[0]), float(self.lambdas[-1])
        k = round(self.steps * (lam - lo) / (hi - lo))
        return k if 0 <= k <= self.steps else None

    def _high(self, i_s: int, i_t: int, order: int) -> np.ndarray:
        """∫_s^t e^{L+S−L_s−S_s}·(λ−λ_s)^order/order! dλ (the reference's high-order coefficient)."""
        L, S = self._integrals["L"], self._integrals["S"]  # type: ignore[attr-defined]
        ts = self._ts  # type: ignore[attr-defined]
        a = L[i_s : i_t + 1] + S[i_s : i_t + 1] - L[i_s] - S[i_s]
        x = np.broadcast_to(ts[i_s : i_t + 1], a.shape)
        b = (x - ts[i_s]) ** order / math.factorial(order)
        return cumulative_exp_trapezoid(a, x, b, cumsum=False)

    def table(self, lambdas: Sequence[float]) -> EMSTable:
        """What a schedule with points at ``lambdas`` (its timesteps and the final noise level) needs."""
        idx = [self.index(float(v)) for v in lambdas]
        nan = np.full(self.shape, np.nan)
        rows: dict[str, np.ndarray] = {}
        for name in _ROWS:
            values = self.l if name == "l" else self._integrals[name]  # type: ignore[attr-defined]
            rows[name] = np.stack([values[k] if k is not None else nan for k in idx])
        high = []
        for k in range(len(idx) - 1):
            i_s, i_t = idx[k], idx[k + 1]
            if i_s is None or i_t is None:
                high.append(np.stack([nan] * HIGH_ORDERS))
            else:
                high.append(np.stack([self._high(i_s, i_t, n) for n in range(1, HIGH_ORDERS + 1)]))
        grid = tuple(float(self.lambdas[k]) if k is not None else None for k in idx)
        return EMSTable(grid, high=np.stack(high), source=self.source, **rows)


@dataclass(frozen=True, eq=False)
class EMSTable:
    """The EMS rows of one schedule: point k (its timesteps, then the final noise level) and step k → k + 1.

    ``lambdas[k]`` is the grid λ point k was snapped to (None: outside the statistics' range, a row of
    NaN; a v3 step cannot start or land there). ``high[k, n − 1]`` is step k's order-n coefficient.
    """

    lambdas: tuple[float | None, ...]
    l: np.ndarray  # noqa: E741 - the paper's and the reference's name
    L: np.ndarray
    S: np.ndarray
    B: np.ndarray
    I: np.ndarray  # noqa: E741 - the paper's and the reference's name
    C: np.ndarray
    high: np.ndarray
    source: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.lambdas)
        for name in _ROWS:
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape[:1] != (n,) or value.ndim < 2:
                raise ProfileError(f"solver.ems.{name}: shape {value.shape}; expected ({n}, *sample shape)")
            object.__setattr__(self, name, value)
        if not all(getattr(self, name).shape == self.l.shape for name in _ROWS):
            raise ProfileError("solver.ems: the rows' shapes differ")
        high = np.asarray(self.high, dtype=np.float64)
        if high.shape != (n - 1, HIGH_ORDERS, *self.l.shape[1:]):
            raise ProfileError(f"solver.ems.high: shape {high.shape}; expected ({n - 1}, {HIGH_ORDERS}, *sample shape)")
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "source", dict(self.source))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    def covers(self, k: int) -> bool:
        return 0 <= k < len(self.lambdas) and self.lambdas[k] is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lambdas": list(self.lambdas)}
        out.update({name: encode_array(getattr(self, name)) for name in (*_ROWS, "high")})
        out["source"] = dict(self.source)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "solver.ems") -> EMSTable:
        if not isinstance(data, Mapping):
            raise ProfileError(f"{where}: expected an object, got {str(data)[:80]!r}")
        missing = {"lambdas", *_ROWS, "high"} - set(data)
        unknown = set(data) - {"lambdas", *_ROWS, "high", "source"}
        if missing or unknown:
            raise ProfileError(f"{where}: missing {sorted(missing)}, unknown {sorted(unknown)}")
        lambdas = data["lambdas"]
        if not isinstance(lambdas, list) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) for v in lambdas
        ):
            raise ProfileError(f"{where}.lambdas: expected a list of numbers or nulls")
        source = data.get("source", {})
        if not isinstance(source, Mapping):
            raise ProfileError(f"{where}.source: expected an object")
        arrays = {name: decode_array(data[name], f"{where}.{name}") for name in (*_ROWS, "high")}
        return cls(tuple(None if v is None else float(v) for v in lambdas), source=source, **arrays)

    @property
    def digest(self) -> str:
        cached = self.__dict__.get("_digest")
        if cached is None:
            text = json.dumps(self.to_dict(), sort_keys=True)
            cached = hashlib.sha256(text.encode()).hexdigest()
            object.__setattr__(self, "_digest", cached)
        return cached

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EMSTable) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)
