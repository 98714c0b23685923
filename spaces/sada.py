"""The ``sada`` space: SADA's step- and token-wise sparsity, searched over its knobs.

SADA (TECHNIQUES.md §6; :mod:`difftune.accel.sada`) skips the next step when the mean "momentum" of
the stability criterion is at most a threshold τ inside an acceleration range, extrapolates x̂₀ by
Lagrange interpolation late in the trajectory, and prunes tokens ToMe-style on computed steps. The
reference fixes τ = 0 and ships one column of settings per family (SD-2, SDXL, Flux); here every
knob is a variable, and a point decodes to a :class:`~difftune.accel.sada.SADAConfig` (profile
section ``sparsity``).

Variables (step positions as fractions of ``num_inference_steps``, so one point means the same at
20 and at 50 steps; the reference's 50-step values are the defaults):

- ``threshold`` τ (−0.01 … 0.02, default 0): larger skips more steps. The mean momentum's scale
  is small: on the embedded model its quartiles are −8.5e-4 / −3.7e-4 / 1.1e-3 at 20 steps and
  −1.6e-4 / −8e-5 / 1e-4 at 50.
- ``acc_start`` (0.05 … 0.5, default 10/50) and ``acc_end`` (0.6 … 1, default 47/50): the
  acceleration range ``(round(acc_start·steps), round(acc_end·steps))``.
- ``max_interval`` (1 … 6, default 4): skipped steps in a row at most, and the token caches'
  refresh period.
- ``lagrange_term`` (0 … 4, default 4; 0 = no Lagrange phase), ``lagrange_int`` (2 … 6, default 4)
  and ``lagrange_start`` (0.2 … 0.9, default 24/50): the Lagrange phase starts at
  ``round(lagrange_start·steps)`` rounded down to a multiple of ``lagrange_int`` (the reference
  asserts that the phase starts on a computed step), at least ``lagrange_int``.
- token pruning, only for denoisers made of ``BasicTransformerBlock`` s (the embedded model, DiT,
  PixArt, SD, SDXL): ``sx``, ``sy`` (1 … 4, default 3), ``max_downsample`` (0 … 2, 0 = off; default
  the family's reference: 2 for SDXL, else 1) and ``max_fix`` (0 … 10 240 in steps of 256; default
  5 120, SDXL 10 240). Flux and SD3 get ``max_downsample = 0`` and no pruning variables, as the
  reference's Flux column.

Baselines: ``sada_off`` (an empty acceleration range: the plain pipeline), and the reference
columns that apply to the family — ``sada_sd2`` (τ = 0, the SD-2 defaults), ``sada_sdxl`` and
``sada_flux`` — scaled to the study's step count. Default searcher: TPE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from difftune.accel.sada import SADAConfig
from difftune.errors import SpaceError

from ._base import NamedPoint, Space, SpaceContext, Variable, register_space

__all__ = ["PRUNING_FAMILIES", "REFERENCE_COLUMNS", "SADASpace"]

#: Families whose denoiser is made of ``BasicTransformerBlock`` s, where SADA prunes tokens.
PRUNING_FAMILIES = ("embedded", "dit", "pixart", "sd", "sdxl")

#: SADA's reference settings for SD-2 at 50 steps (TECHNIQUES.md §6), step positions as shares of the steps.
_SD2: Mapping[str, Any] = {
    "threshold": 0.0,
    "acc_start": 10 / 50,
    "acc_end": 47 / 50,
    "max_interval": 4,
    "lagrange_term": 4,
    "lagrange_int": 4,
    "lagrange_start": 24 / 50,
    "sx": 3,
    "sy": 3,
    "max_downsample": 1,
    "max_fix": 5120,
}
#: The reference's columns per family: SDXL and Flux differ from SD-2 in these keys only.
REFERENCE_COLUMNS: Mapping[str, Mapping[str, Any]] = {
    "sd2": _SD2,
    "sdxl": {**_SD2, "max_downsample": 2, "max_fix": 10240},
    "flux": {**_SD2, "lagrange_term": 3, "lagrange_start": 20 / 50, "max_downsample": 0, "max_fix": 0},
}
_PRUNING = ("sx", "sy", "max_downsample", "max_fix")


def _prunes(context: SpaceContext) -> bool:
    return context.info.family in PRUNING_FAMILIES


@register_space("sada")
class SADASpace(Space):
    """SADA's knobs; see the module docstring. ``decode`` gives ``{"sparsity": SADAConfig}``."""

    default_searcher = "tpe"
    sections = ("sparsity",)

    def variables(self, context: SpaceContext) -> list[Variable]:
        steps = context.num_inference_steps
        if steps < 4:
            raise SpaceError(f"space 'sada': needs at least 4 steps (SADA decides from step 3 on), got {steps}")
        column = REFERENCE_COLUMNS["sdxl" if context.info.family == "sdxl" else "sd2"]
        out = [
            Variable(
                "threshold", "float", -0.01, 0.02, default=0.0, help="τ: skip the next step when mean momentum ≤ τ"
            ),
            Variable("acc_start", "float", 0.05, 0.5, default=10 / 50, help="start of the acceleration range (share)"),
            Variable("acc_end", "float", 0.6, 1.0, default=47 / 50, help="end of the acceleration range (share)"),
            Variable("max_interval", "int", 1, 6, default=4, help="skipped steps in a row at most"),
            Variable("lagrange_term", "int", 0, 4, default=4, help="points of the Lagrange extrapolation (0: none)"),
            Variable("lagrange_int", "int", 2, 6, default=4, help="spacing of the Lagrange nodes"),
            Variable("lagrange_start", "float", 0.2, 0.9, default=24 / 50, help="start of the Lagrange phase (share)"),
        ]
        if _prunes(context):
            out += [
                Variable("sx", "int", 1, 4, default=3, help="token-pruning window: columns"),
                Variable("sy", "int", 1, 4, default=3, help="token-pruning window: rows"),
                Variable(
                    "max_downsample",
                    "int",
                    0,
                    2,
                    default=int(column["max_downsample"]),
                    help="prune tokens on blocks at most this much coarser than the latent (0: no pruning)",
                ),
                Variable(
                    "max_fix",
                    "int",
                    0,
                    10240,
                    step=256,
                    default=int(column["max_fix"]),
                    help="tokens computed for their momentum at most",
                ),
            ]
        return out

    def _decode(self, params: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        steps = context.num_inference_steps
        interval = int(params["lagrange_int"])
        lagrange_step = max(interval, round(float(params["lagrange_start"]) * steps) // interval * interval)
        pruning = (
            {name: int(params[name]) for name in _PRUNING}
            if _prunes(context)
            else {"sx": 3, "sy": 3, "max_downsample": 0, "max_fix": 0}
        )
        config = SADAConfig(
            threshold=float(params["threshold"]),
            acc_range=(round(float(params["acc_start"]) * steps), round(float(params["acc_end"]) * steps)),
            max_interval=int(params["max_interval"]),
            lagrange_term=int(params["lagrange_term"]),
            lagrange_step=lagrange_step,
            lagrange_int=interval,
            **pruning,
        )
        return {"sparsity": config}

    def encode(self, sections: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """Parameters decoding to the ``sparsity`` section's :class:`SADAConfig` (positions as shares of
        the steps); :class:`SpaceError` for other sections or settings the variables cannot hold."""
        extra = sorted(k for k, v in sections.items() if k != "sparsity" and v is not None)
        config = sections.get("sparsity")
        if extra or not isinstance(config, SADAConfig):
            raise SpaceError(f"space 'sada' encodes a SADA sparsity section only, got {sorted(sections)}")
        steps = context.num_inference_steps
        params: dict[str, Any] = {
            "threshold": config.threshold,
            "acc_start": config.acc_range[0] / steps,
            "acc_end": config.acc_range[1] / steps,
            "max_interval": config.max_interval,
            "lagrange_term": config.lagrange_term,
            "lagrange_int": config.lagrange_int,
            "lagrange_start": config.lagrange_step / steps,
        }
        if _prunes(context):
            params.update({name: getattr(config, name) for name in _PRUNING})
        elif config.prunes_tokens:
            raise SpaceError(f"space 'sada': a {context.info.family} model has no token pruning (max_downsample 0)")
        variables = {v.name: v for v in self.variables(context)}
        outside = [k for k, v in params.items() if not variables[k].contains(v)]
        if outside or self.decode(params, context)["sparsity"] != config:
            raise SpaceError(
                f"space 'sada': this SADA setting is outside the space ({', '.join(outside) or 'rounding'})"
            )
        return params

    def baselines(self, context: SpaceContext) -> list[NamedPoint]:
        """``sada_off`` and the reference columns that apply to the family, scaled to the step count."""
        steps = context.num_inference_steps
        off = SADAConfig(acc_range=(0, 0), max_downsample=0)
        out = [NamedPoint("sada_off", {"sparsity": off}, None, "no SADA: an empty acceleration range")]
        family = context.info.family
        names = ["sd2", "sdxl"] if _prunes(context) else []
        names.append("flux")
        for name in names:
            column = dict(REFERENCE_COLUMNS[name])
            if not _prunes(context):
                for key in _PRUNING:
                    column.pop(key)
            config = self.decode(column, context)["sparsity"]
            where = "" if name.startswith(family) or (name == "sd2" and family == "sd") else f" on a {family} model"
            out.append(
                NamedPoint(
                    f"sada_{name}",
                    {"sparsity": config},
                    self.repair(column, context).params,
                    f"SADA's reference {name.upper()} settings (τ = 0) scaled to {steps} steps{where}",
                )
            )
        return out
