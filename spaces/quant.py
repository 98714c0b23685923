"""The ``quant`` space: per-block weight and activation bit-widths, granularity and symmetry.

A point decodes to a :class:`~difftune.accel.QuantConfig` (profile section ``quantization``): one
:class:`~difftune.accel.QuantSpec` per *unit* — each block of the denoiser
(:attr:`~difftune.models.ModelInfo.blocks`), and ``rest`` for every Linear / Conv2d outside them
(embeddings, input and output projections) — sharing the point's granularity and symmetry.

Variables (``k`` indexes the model's blocks):

- ``w_k`` / ``w_rest`` — weight bits {16, 8, 4} (16 leaves the weights as they are);
- ``a_k`` / ``a_rest`` — activation bits {16, 8}, quantized dynamically at each layer's input;
- ``granularity`` (``channel`` / ``group``), ``group_size`` {32, 64, 128} (``group`` only; a
  ``channel`` point has it repaired to 128, so equal configs are one point), ``symmetric``, and
  ``activation_granularity`` (``tensor`` / ``token``).

Objectives by default: ``weight_memory_mb`` (the weights as served, minimised), ``psnr`` and the
study's guard (class accuracy on the embedded model, sharpness elsewhere) — simulated quantization
costs the same time at any bit-width, so speed is not what it trades. ``backend="torchao"``
(``get_space("quant", backend="torchao")``) writes profiles that run torchao's int8 kernels where
they exist; the default ``"simulated"`` measures quality on any device, and the profile says which.

Baselines: no quantization, and W8A16, W8A8 (per token), W4A16 (per channel) and W4A16 (group
32) on every layer. Seeds (NSGA-II's generation 0, after the baselines), from a measured
per-unit sensitivity (:func:`~difftune.evaluators.sensitivity.quantization_sensitivity`: the PSNR
when only that unit's weights go to 4 bits, or only its activations to 8, on the study's first
calibration samples; cached per model): the least sensitive half of the units at W4 and the rest
at W8; every unit at W4 but the most sensitive (W8); W8A8 everywhere but the most
activation-sensitive unit (A16).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from difftune.accel.quant import QuantConfig, QuantSpec
from difftune.errors import SpaceError

from ._base import NamedPoint, Space, SpaceContext, Variable, register_space

__all__ = ["QuantSpace"]

_REST = "rest"
_GLOBALS = ("granularity", "group_size", "symmetric", "activation_granularity")


@register_space("quant")
class QuantSpace(Space):
    """Per-block quantization bit-widths; see the module docstring.

    Args:
        backend: the profiles' ``quantization.backend`` (``"simulated"`` or ``"torchao"``).
        cache_dir: where sensitivities are kept (default ``<difftune cache>/sensitivity``).
    """

    default_searcher = "nsga2"
    default_budget = 24
    sections = ("quantization",)

    def __init__(self, *, backend: str = "simulated", cache_dir: str | Path | None = None) -> None:
        if backend not in ("simulated", "torchao"):
            raise SpaceError(f"space 'quant': backend {backend!r} is not one of simulated, torchao")
        self.backend = backend
        self.cache_dir = cache_dir
        self._sensitivity: dict[tuple[Any, ...], Any] = {}

    def default_objectives(self, family: str) -> tuple[tuple[str, str], ...]:
        guard = "class_accuracy" if family == "embedded" else "sharpness"
        return (("weight_memory_mb", "minimize"), ("psnr", "maximize"), (guard, "maximize"))

    @staticmethod
    def units(context: SpaceContext) -> list[str]:
        """The model's blocks (module paths inside the denoiser) and ``rest``."""
        if not context.info.blocks:
            raise SpaceError(f"space 'quant': the {context.info.family} model reports no blocks to quantize by")
        return [*context.info.blocks, _REST]

    # ---- variables / repair ----------------------------------------------------------------

    def variables(self, context: SpaceContext) -> list[Variable]:
        out = []
        for k, unit in enumerate(self.units(context)):
            key = _REST if unit == _REST else str(k)
            where = "every layer outside the blocks" if unit == _REST else unit
            out.append(
                Variable(f"w_{key}", "categorical", choices=(16, 8, 4), default=16, help=f"weight bits of {where}")
            )
            out.append(
                Variable(f"a_{key}", "categorical", choices=(16, 8), default=16, help=f"activation bits of {where}")
            )
        out += [
            Variable(
                "granularity", "categorical", choices=("channel", "group"), default="channel", help="weight scales"
            ),
            Variable("group_size", "categorical", choices=(32, 64, 128), default=128, help="inputs per group scale"),
            Variable("symmetric", "bool", default=True, help="no zero point in the weight scales"),
            Variable(
                "activation_granularity",
                "categorical",
                choices=("tensor", "token"),
                default="tensor",
                help="one activation range per tensor or per token",
            ),
        ]
        return out

    def _repair(self, params: dict[str, Any], context: SpaceContext) -> list[str]:
        if params["granularity"] == "channel" and params["group_size"] != 128:
            before, params["group_size"] = params["group_size"], 128
            return [f"group_size: {before} has no effect with per-channel scales; set to 128"]
        return []

    # ---- decode / encode -------------------------------------------------------------------

    def _keys(self, context: SpaceContext) -> list[tuple[str, str]]:
        return [(unit, _REST if unit == _REST else str(k)) for k, unit in enumerate(self.units(context))]

    def _decode(self, params: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        shared = {name: params[name] for name in _GLOBALS}

        def spec(key: str) -> QuantSpec:
            return QuantSpec(weight_bits=int(params[f"w_{key}"]), activation_bits=int(params[f"a_{key}"]), **shared)

        default = spec(_REST)
        layers = {unit: spec(key) for unit, key in self._keys(context) if unit != _REST and spec(key) != default}
        return {"quantization": QuantConfig(backend=self.backend, default=default, layers=layers)}

    def encode(self, sections: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """The point of a :class:`QuantConfig` whose ``layers`` are whole blocks sharing the default's scales."""
        config = sections.get("quantization")
        extra = sorted(k for k, v in sections.items() if k != "quantization" and v is not None)
        if extra:
            raise SpaceError(f"space 'quant' encodes only the quantization section, got {extra}")
        if isinstance(config, Mapping):
            config = QuantConfig.from_dict(config)
        if not isinstance(config, QuantConfig):
            raise SpaceError(f"space 'quant': expected a QuantConfig in sections['quantization'], got {config!r}")
        if config.backend != self.backend:
            raise SpaceError(f"space 'quant': backend {config.backend!r}, the space writes {self.backend!r}")
        units = dict(self._keys(context))
        stray = sorted(set(config.layers) - set(units))
        if stray:
            raise SpaceError(f"space 'quant': layers {stray} are not whole blocks of this model")
        params: dict[str, Any] = {name: getattr(config.default, name) for name in _GLOBALS}
        for unit, key in units.items():
            spec = config.default if unit == _REST else config.layers.get(unit, config.default)
            if any(getattr(spec, name) != params[name] for name in _GLOBALS):
                raise SpaceError(f"space 'quant': {unit} has its own scales; the space shares one setting")
            if spec.activation_symmetric is not True:
                raise SpaceError("space 'quant': asymmetric activations are not part of the space")
            params[f"w_{key}"], params[f"a_{key}"] = spec.weight_bits, spec.activation_bits
        if self.repair(params, context).changes:
            raise SpaceError("space 'quant': the config is not a point of the space")
        return params

    # ---- baselines and seeds ---------------------------------------------------------------

    def _uniform(self, context: SpaceContext, w: int, a: int, **shared: Any) -> dict[str, Any]:
        params = self.default_params(context)
        for _, key in self._keys(context):
            params[f"w_{key}"], params[f"a_{key}"] = w, a
        params.update(shared)
        return params

    def _point(self, name: str, params: dict[str, Any], context: SpaceContext, description: str) -> NamedPoint:
        return NamedPoint(name, self.decode(params, context), params, description)

    def baselines(self, context: SpaceContext) -> list[NamedPoint]:
        """No quantization; W8A16, W8A8 (per token), W4A16 per channel and per 32-group on every layer."""
        return [
            self._point("w16a16", self._uniform(context, 16, 16), context, "no quantization"),
            self._point("w8a16", self._uniform(context, 8, 16), context, "8-bit weights everywhere, per channel"),
            self._point(
                "w8a8",
                self._uniform(context, 8, 8, activation_granularity="token"),
                context,
                "8-bit weights and per-token 8-bit activations everywhere (SmoothQuant-free W8A8)",
            ),
            self._point("w4a16", self._uniform(context, 4, 16), context, "4-bit weights everywhere, per channel"),
            self._point(
                "w4a16_g32",
                self._uniform(context, 4, 16, granularity="group", group_size=32),
                context,
                "4-bit weights everywhere, one scale per 32 inputs",
            ),
        ]

    def sensitivity(self, context: SpaceContext) -> Any:
        """The per-unit sensitivity on the study's first calibration samples (measured once, then memoised)."""
        from difftune.evaluators.sensitivity import quantization_sensitivity

        from ._spacing import study_samples_and_call

        samples, call = study_samples_and_call(context, "quant")
        call = {**call, "num_inference_steps": context.num_inference_steps}
        if context.guidance_scale is not None:
            call["guidance_scale"] = context.guidance_scale
        units = self.units(context)
        key = (context.info.fingerprint, tuple(units), samples, repr(sorted(call.items())))
        if key not in self._sensitivity:
            self._sensitivity[key] = quantization_sensitivity(
                context.pipeline, units, samples, call_kwargs=call, cache_dir=self.cache_dir
            )
        return self._sensitivity[key]

    def seeds(self, context: SpaceContext) -> list[NamedPoint]:
        """Three points from the measured sensitivity (module docstring); none without the pipeline."""
        if context.pipeline is None:
            return []
        found = self.sensitivity(context)
        keys = dict(self._keys(context))
        by_weight = found.ranked("weights")  # least sensitive first
        by_activation = found.ranked("activations")
        half = self._uniform(context, 8, 16)
        for unit in by_weight[: len(by_weight) // 2]:
            half[f"w_{keys[unit]}"] = 4
        most = self._uniform(context, 4, 16)
        most[f"w_{keys[by_weight[-1]]}"] = 8
        w8a8 = self._uniform(context, 8, 8, activation_granularity="token")
        w8a8[f"a_{keys[by_activation[-1]]}"] = 16

        def listed(units: list[str], table: Mapping[str, float]) -> str:
            return ", ".join(f"{u} {table[u]:.1f} dB" for u in units)

        return [
            self._point(
                "sens_w4_half",
                half,
                context,
                "W4 on the least W4-sensitive half of the units, W8 on the rest; PSNR with only that unit at W4: "
                + listed(by_weight, found.weights),
            ),
            self._point(
                "sens_w4_but_one",
                most,
                context,
                f"W4 everywhere but the most W4-sensitive unit ({by_weight[-1]}, W8)",
            ),
            self._point(
                "sens_w8a8_but_one",
                w8a8,
                context,
                f"W8A8 per token everywhere but the most A8-sensitive unit ({by_activation[-1]}, A16); PSNR with "
                "only that unit at A8: " + listed(by_activation, found.activations),
            ),
        ]
