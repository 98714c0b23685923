"""The ``joint`` space: solver × cache × sparsity × quantization, every point measured as a whole.

Fewer steps (the ``solver`` space), cheaper steps (``cache``), skipped steps (``sada``) and smaller
weights (``quant``) compound — and their errors interact (CacheQuant: quantization alone −0.76 FID,
caching alone −4.71, both applied naively −11.99), so a point of this space is one profile with up
to four sections, measured as it will be served, never composed from separate studies' numbers:

- a USF schedule of ``nfe`` evaluations (the ``solver`` space's variables) with two DC-Solver
  compensation ratios: ``dc_ratio`` for the steps from the third to the one before last and
  ``dc_last`` for the last step (DC-Solver keeps the first two ratios at 1: its Lagrange
  interpolation needs three buffered outputs; it searches within 1 ± 0.5);
- ``use_cache``: a structured cache mask of ``nfe`` steps × blocks × components over those
  evaluations (the ``cache`` space's variables, their ranges those of the largest NFE, clamped to
  the point's NFE by :meth:`JointSpace.repair`);
- ``use_sada``: SADA's sparsity on the schedule's steps (the ``sada`` space's variables, prefixed
  ``sada_``; step positions are shares of the steps, so they read the same at any NFE);
- ``use_quant``: per-block weight / activation bits (the ``quant`` space's variables, prefixed ``q_``).

Repairs, each reported in a sentence: a cache with fewer than 2 evaluations, and SADA with fewer
than :data:`SADA_MIN_NFE` (it decides from the third step on about the next one, so a shorter
schedule leaves nothing to skip), are switched off; the parts' own repairs apply (cache ranges
clamped to the NFE; per-channel quantization's group size).

Measured on the embedded model (50-step reference, 20 samples): a tuned 4-step schedule gained
0.5 dB from ``dc_last`` = 1.2 alone (29.45 → 29.93 dB PSNR); ratios below 1 lost up to 1.3 dB.

    >>> space = get_space("joint")
    >>> context = SpaceContext.from_pipeline(pipe, num_inference_steps=50, nfe_range=(3, 12))
    >>> sections = space.decode({"nfe": 5, "grid": "leading", "use_cache": True, "interval_0": 2}, context)
    >>> sorted(sections)   # {'solver': SolverSchedule(5 steps), 'cache': CacheMaskConfig(5 × 6 × 2)}
    ['cache', 'solver']

Objectives by default: speedup, PSNR, ``weight_memory_mb`` (so that quantized points, which a
simulated backend does not make faster, can reach the front) and the study's guard.
``JointSpace(parts=("solver", "cache"))`` is the solver × cache space alone (speedup, PSNR, guard).

Baselines: every ``solver`` baseline (DPM-Solver++, UniPC, DDIM at each NFE, best spacing; no
cache), every ``cache`` baseline at the reference's ``num_inference_steps`` (FORA,
FirstBlockCache on the pipeline's own scheduler), SADA's reference column for the family and W8A16
and W4A16 (group 32) at the reference's steps — so a joint front is drawn against every single
technique's hand-made settings. :meth:`JointSpace.stack` composes the best points of single-space
studies into one joint point (``--stack-from``), the naive stack the joint front is compared with.
Default searcher: TPE (mixed, conditional variables).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from difftune.accel.solver import SolverSchedule
from difftune.errors import SpaceError

from ._base import NamedPoint, Space, SpaceContext, Variable, register_space
from .cache import CacheSpace
from .quant import QuantSpace
from .sada import SADASpace
from .solver import SolverSpace

__all__ = ["DC_RANGE", "PARTS", "SADA_MIN_NFE", "JointSpace"]

#: DC-Solver's search range of a compensation ratio.
DC_RANGE = (0.5, 1.5)
#: Steps before this index keep ratio 1 (the interpolation needs dc_order + 1 = 3 buffered outputs).
DC_FIRST = 2
#: SADA decides from step 3 on whether to skip the next step; below this many evaluations it is switched off.
SADA_MIN_NFE = 6
#: The techniques a joint point may combine (profile sections), in the order they are listed.
PARTS = ("solver", "cache", "sparsity", "quantization")
_PREFIX = {"sparsity": "sada_", "quantization": "q_"}
_FLAG = {"cache": "use_cache", "sparsity": "use_sada", "quantization": "use_quant"}


def _strip(params: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def _prefixed(params: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in params.items()}


class _EvaluationSolver(SolverSpace):
    """The solver space without USF's analytical first step: the joint space's cache masks and DC ratios are per
    model evaluation, and an analytical step is a grid step without one (it is searched in the solver space)."""

    def variables(self, context: SpaceContext) -> list[Variable]:
        return [v for v in super().variables(context) if v.name != "analytic_first"]

    def encode(self, sections: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        schedule = sections.get("solver")
        if getattr(schedule, "analytic_first", False) or (
            isinstance(schedule, Mapping) and schedule.get("analytic_first")
        ):
            raise SpaceError(
                "space 'joint': the analytical first step is searched in the solver space (the joint space's cache "
                "masks and DC ratios are per model evaluation)"
            )
        return super().encode(sections, context)


@register_space("joint")
class JointSpace(Space):
    """Solver × cache × sparsity × quantization in one point (see the module docstring).

    Args:
        parts: the sections a point may fill; ``"solver"`` always (a point is a schedule), any of
            ``"cache"``, ``"sparsity"`` and ``"quantization"`` besides.
        backend: the quantization section's backend (``"simulated"`` or ``"torchao"``).
    """

    default_searcher = "tpe"
    default_budget = 96
    sections = PARTS

    def __init__(self, *, parts: Sequence[str] = PARTS, backend: str = "simulated") -> None:
        unknown = sorted(set(parts) - set(PARTS))
        if unknown or "solver" not in parts:
            raise SpaceError(f"space 'joint': parts {list(parts)} must include 'solver', others from {list(PARTS)}")
        self.parts = tuple(p for p in PARTS if p in parts)
        self.solver = _EvaluationSolver()
        self.cache = CacheSpace()
        self.sada = SADASpace()
        self.quant = QuantSpace(backend=backend)

    def default_objectives(self, family: str) -> tuple[tuple[str, str], ...] | None:
        if "quantization" not in self.parts:
            return None
        guard = "class_accuracy" if family == "embedded" else "sharpness"
        return (("speedup", "maximize"), ("psnr", "maximize"), ("weight_memory_mb", "minimize"), (guard, "maximize"))

    # ---- the parts' contexts and parameters ------------------------------------------------

    def _at(self, context: SpaceContext, steps: int | None = None) -> SpaceContext:
        """The context of a part that works on ``steps`` steps (default: the largest NFE)."""
        return context.replace(num_inference_steps=steps if steps is not None else context.nfe_range[1])

    def _sada_context(self, context: SpaceContext, steps: int | None = None) -> SpaceContext:
        return self._at(context, max(steps if steps is not None else context.nfe_range[1], 4))

    def _names(self, space: Space, context: SpaceContext) -> set[str]:
        return {v.name for v in space.variables(context)}

    def _split(self, params: Mapping[str, Any], context: SpaceContext) -> tuple[dict[str, Any], dict[str, Any]]:
        solver_names = self._names(self.solver, context)
        cache_names = self._names(self.cache, self._at(context)) if "cache" in self.parts else set()
        solver = {k: v for k, v in params.items() if k in solver_names}
        cache = {k: v for k, v in params.items() if k in cache_names}
        return solver, cache

    def variables(self, context: SpaceContext) -> list[Variable]:
        if context.nfe_range[1] < 2:
            raise SpaceError(f"space 'joint': needs an NFE range reaching at least 2, got {context.nfe_range}")
        out = [
            *self.solver.variables(context),
            Variable("dc_ratio", "float", *DC_RANGE, default=1.0, help="DC-Solver ratio of steps 3 … n−1"),
            Variable("dc_last", "float", *DC_RANGE, default=1.0, help="DC-Solver ratio of the last step"),
        ]
        if "cache" in self.parts:
            out += [
                Variable("use_cache", "bool", default=False, help="reuse cached block outputs between the evaluations"),
                *self.cache.variables(self._at(context)),
            ]
        if "sparsity" in self.parts:
            out.append(Variable("use_sada", "bool", default=False, help="SADA: skip stable steps, prune tokens"))
            out += [
                dataclasses.replace(v, name=f"sada_{v.name}", help=f"SADA: {v.help}")
                for v in self.sada.variables(self._sada_context(context))
            ]
        if "quantization" in self.parts:
            out.append(Variable("use_quant", "bool", default=False, help="quantize weights / activations per block"))
            out += [
                dataclasses.replace(v, name=f"q_{v.name}", help=f"quantization: {v.help}")
                for v in self.quant.variables(context)
            ]
        return out

    def _repair(self, params: dict[str, Any], context: SpaceContext) -> list[str]:
        solver, cache = self._split(params, context)
        fixed = self.solver.repair(solver, context)
        params.update(fixed.params)
        changes = list(fixed.changes)
        n = int(params["nfe"])
        if "cache" in self.parts:
            if params["use_cache"] and n < 2:
                params["use_cache"] = False
                changes.append(f"use_cache: {n} evaluation(s) leave nothing to reuse; set to False")
            if params["use_cache"]:
                repaired = self.cache.repair(cache, self._at(context, n))
                params.update(repaired.params)
                changes += [f"{c} (at nfe {n})" for c in repaired.changes]
        if "sparsity" in self.parts and params["use_sada"] and n < SADA_MIN_NFE:
            params["use_sada"] = False
            changes.append(
                f"use_sada: SADA decides from the third step on whether to skip the next one, so {n} evaluation(s) "
                f"leave it nothing to skip (it needs {SADA_MIN_NFE}); set to False"
            )
        if "quantization" in self.parts:
            repaired = self.quant.repair(_strip(params, "q_"), context)
            params.update(_prefixed(repaired.params, "q_"))
            changes += [f"q_{c}" for c in repaired.changes]
        return changes

    # ---- decode / encode -------------------------------------------------------------------

    def _decode(self, params: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        solver, cache = self._split(params, context)
        sections = dict(self.solver._decode(solver, context))
        schedule = sections["solver"]
        n = schedule.num_steps
        ratios = [1.0 if i < DC_FIRST else float(params["dc_ratio"]) for i in range(n)]
        if n > DC_FIRST:
            ratios[-1] = float(params["dc_last"])
        steps = tuple(dataclasses.replace(s, dc_ratio=r) for s, r in zip(schedule.steps, ratios, strict=True))
        sections["solver"] = dataclasses.replace(schedule, steps=steps)
        n = int(params["nfe"])
        if "cache" in self.parts and params["use_cache"]:
            sections.update(self.cache._decode(cache, self._at(context, n)))
        if "sparsity" in self.parts and params["use_sada"]:
            sections.update(self.sada._decode(_strip(params, "sada_"), self._sada_context(context, n)))
        if "quantization" in self.parts and params["use_quant"]:
            sections.update(self.quant._decode(_strip(params, "q_"), context))
        return sections

    def encode(self, sections: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """Parameters of a solver schedule and, where given, a cache mask over its steps, a SADA
        setting and a quantization setting; :class:`SpaceError` for anything the space cannot hold."""
        extra = sorted(k for k, v in sections.items() if k not in self.parts and v is not None)
        if extra:
            raise SpaceError(f"space 'joint' encodes only the {', '.join(self.parts)} sections, got {extra}")
        if sections.get("solver") is None:
            raise SpaceError("space 'joint': a point always has a solver schedule")
        params = self.default_params(context)
        schedule = sections["solver"]
        if isinstance(schedule, Mapping):
            schedule = SolverSchedule.from_dict(schedule)
        ratios = [s.dc_ratio for s in schedule.steps]
        n = len(ratios)
        middle = set(ratios[DC_FIRST:-1]) or {1.0}
        if any(r != 1.0 for r in ratios[:DC_FIRST]) or len(middle) > 1 or (n <= DC_FIRST and ratios[-1] != 1.0):
            raise SpaceError(
                f"space 'joint': DC ratios {ratios} are not 1 on the first {DC_FIRST} steps, one ratio in between "
                "and one on the last step"
            )
        params["dc_ratio"] = middle.pop()
        params["dc_last"] = ratios[-1] if n > DC_FIRST else 1.0
        plain = dataclasses.replace(schedule, steps=tuple(dataclasses.replace(s, dc_ratio=1.0) for s in schedule.steps))
        params.update(self.solver.encode({"solver": plain}, context))
        n = int(params["nfe"])
        for part, flag in _FLAG.items():
            if part in self.parts:
                params[flag] = sections.get(part) is not None
        if sections.get("cache") is not None:
            params.update(self.cache.encode({"cache": sections["cache"]}, self._at(context, n)))
        if sections.get("sparsity") is not None:
            if n < SADA_MIN_NFE:
                raise SpaceError(f"space 'joint': SADA needs at least {SADA_MIN_NFE} evaluations, the schedule has {n}")
            found = self.sada.encode({"sparsity": sections["sparsity"]}, self._sada_context(context, n))
            params.update(_prefixed(found, "sada_"))
        if sections.get("quantization") is not None:
            params.update(_prefixed(self.quant.encode({"quantization": sections["quantization"]}, context), "q_"))
        return params

    # ---- baselines, seeds, stacks ----------------------------------------------------------

    def baselines(self, context: SpaceContext) -> list[NamedPoint]:
        """The solver space's baselines (nothing else on), and at the reference's steps on the pipeline's
        own scheduler: the cache space's, SADA's reference column for the family, W8A16 and W4A16 (g32)."""
        out = []
        defaults = self.default_params(context)
        off = {flag: False for part, flag in _FLAG.items() if part in self.parts}
        for point in self.solver.baselines(context):
            params = None if point.params is None else {**defaults, **point.params, **off}
            out.append(NamedPoint(point.name, point.sections, params, point.description))
        if "cache" in self.parts:
            for point in self.cache.baselines(context):
                if point.name == "identity":
                    continue  # the reference setting itself: no faster, nothing to compare
                out.append(NamedPoint(point.name, point.sections, None, point.description))
        if "sparsity" in self.parts and context.num_inference_steps >= 4:
            family = context.info.family
            column = "sdxl" if family == "sdxl" else "flux" if family in ("flux", "sd3") else "sd2"
            for point in self.sada.baselines(context):
                if point.name == f"sada_{column}":
                    out.append(NamedPoint(point.name, point.sections, None, point.description))
        if "quantization" in self.parts:
            for point in self.quant.baselines(context):
                if point.name in ("w8a16", "w4a16_g32"):
                    out.append(NamedPoint(point.name, point.sections, None, point.description))
        return out

    def seeds(self, context: SpaceContext) -> list[NamedPoint]:
        """UniPC at its best spacing for NFE 4–6 with a light cache — every component reused at steps
        1, 4, 7, … (interval 2, refresh 3: at 4 evaluations step 1 only) — and a last-step DC ratio
        of 1.15; with quantization in the space, the NFE-5 one also with 8-bit weights everywhere.

        Measured on the embedded model (50-step reference): reusing every block's output at step 1
        of a 4-step schedule cut its FLOPs by 24 % for 1.2 dB PSNR, reusing at step 3 cost 6 dB,
        and a last-step ratio of 1.2 gained 0.5 dB — so these are promising starts the searcher
        refines (interval, warm-up, components, ratios), not settings anyone ships as they are.
        """
        if "cache" not in self.parts:
            return []
        lo, hi = context.nfe_range
        by_name = {p.name: p for p in self.solver.baselines(context)}
        cache_names = [v.name for v in self.cache.variables(self._at(context))]
        out = []
        for n in range(max(lo, 4), min(hi, 6) + 1):
            base = by_name.get(f"unipc_nfe{n}")
            if base is None or base.params is None:
                continue
            params = {**self.default_params(context), **base.params, "use_cache": True, "dc_last": 1.15}
            for name in cache_names:
                if name.startswith("interval_"):
                    params[name] = 2
                elif name.startswith("warmup_"):
                    params[name] = 0
                elif name.startswith("cache_"):
                    params[name] = True
            params["refresh"] = 3  # everything recomputes at steps 0, 3, 6, …
            fixed = self.repair(params, context).params
            out.append(NamedPoint(f"unipc_nfe{n}+step1_cache", self._decode(fixed, context), dict(fixed)))
            if n == 5 and "quantization" in self.parts:
                w8 = {**fixed, "use_quant": True, **{k: 8 for k in fixed if k.startswith("q_w_")}}
                w8 = dict(self.repair(w8, context).params)
                out.append(NamedPoint(f"unipc_nfe{n}+step1_cache+w8a16", self._decode(w8, context), w8))
        return out

    def stack(
        self, picks: Mapping[str, tuple[str, Mapping[str, Any]]], context: SpaceContext, *, name: str | None = None
    ) -> NamedPoint:
        """The naive stack of single-space points: one joint point that turns on each given part with
        the settings its own study chose.

        Args:
            picks: space name (``solver``, ``cache``, ``sada``, ``quant``) → (a label, that space's
                parameters). A cache or SADA point keeps its knobs (intervals, warm-ups, shares of the
                steps) on the solver point's evaluations; without a solver point the stack runs on the
                schedule the joint space defaults to. Each part's repairs apply and are listed.
        """
        allowed = {"solver": "solver", "cache": "cache", "sada": "sparsity", "quant": "quantization"}
        unknown = sorted(k for k in picks if k not in allowed or allowed[k] not in self.parts)
        if unknown:
            usable = [k for k, v in allowed.items() if v in self.parts]
            raise SpaceError(
                f"space 'joint': cannot stack points of {unknown}: only {usable} studies' points are points of "
                "this space's parts"
            )
        params = self.default_params(context)
        for space, (_, point) in picks.items():
            if space == "solver":  # a wider NFE range has more per-step variables: those beyond this range go
                params.update({k: v for k, v in point.items() if k in self._names(self.solver, context)})
            elif space == "cache":
                params.update({k: v for k, v in point.items() if k in self._names(self.cache, self._at(context))})
                params["use_cache"] = True
            elif space == "sada":
                params.update(_prefixed(point, "sada_"))
                params["use_sada"] = True
            else:
                params.update(_prefixed(point, "q_"))
                params["use_quant"] = True
        repaired = self.repair(params, context)
        label = name or "stack[" + " + ".join(f"{k}:{label}" for k, (label, _) in picks.items()) + "]"
        fixes = [c for c in repaired.changes if "missing, set to its default" not in c]
        description = "the naive stack of single-space points: " + ", ".join(
            f"{k} {label}" for k, (label, _) in picks.items()
        )
        if fixes:
            description += "; repaired: " + "; ".join(fixes)
        params = dict(repaired.params)
        return NamedPoint(label, self._decode(params, context), params, description)
