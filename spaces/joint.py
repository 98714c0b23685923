"""The ``joint`` space: a solver schedule and, optionally, a cache schedule on its steps.

Fewer steps (the ``solver`` space) and cheaper steps (the ``cache`` space) compound: a point of this
space is a USF schedule of ``nfe`` evaluations plus, when ``use_cache`` is on, a structured cache
mask of ``nfe`` steps × blocks × components over those evaluations. The variables are the two
spaces' own (their names do not collide), ``use_cache``, and two DC-Solver compensation ratios:
``dc_ratio`` for the steps from the third to the one before last and ``dc_last`` for the last step
(DC-Solver keeps the first two ratios at 1: its Lagrange interpolation needs three buffered
outputs; it searches within 1 ± 0.5). The cache variables' ranges are those of the largest NFE and
are clamped to the point's NFE by :meth:`JointSpace.repair`.

Measured on the embedded model (50-step reference, 20 samples): a tuned 4-step schedule gained
0.5 dB from ``dc_last`` = 1.2 alone (29.45 → 29.93 dB PSNR); ratios below 1 lost up to 1.3 dB.

    >>> space = get_space("joint")
    >>> context = SpaceContext.from_pipeline(pipe, num_inference_steps=50, nfe_range=(3, 12))
    >>> sections = space.decode({"nfe": 5, "grid": "leading", "use_cache": True, "interval_0": 2}, context)
    >>> sorted(sections)   # {'solver': SolverSchedule(5 steps), 'cache': CacheMaskConfig(5 × 6 × 2)}
    ['cache', 'solver']

Baselines: every ``solver`` baseline (DPM-Solver++, UniPC, DDIM at each NFE, best spacing; no
cache) and every ``cache`` baseline at the reference's ``num_inference_steps`` (FORA, DeepCache,
FirstBlockCache on the pipeline's own scheduler) — so a joint front is drawn against both kinds of
hand-made settings. Default searcher: TPE (mixed, conditional variables).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from difftune.accel.solver import SolverSchedule
from difftune.errors import SpaceError

from ._base import NamedPoint, Space, SpaceContext, Variable, register_space
from .cache import CacheSpace
from .solver import SolverSpace

__all__ = ["DC_RANGE", "JointSpace"]

#: DC-Solver's search range of a compensation ratio.
DC_RANGE = (0.5, 1.5)
#: Steps before this index keep ratio 1 (the interpolation needs dc_order + 1 = 3 buffered outputs).
DC_FIRST = 2


@register_space("joint")
class JointSpace(Space):
    """A USF solver schedule plus an optional cache mask over its steps (see the module docstring)."""

    default_searcher = "tpe"
    sections = ("solver", "cache")

    def __init__(self) -> None:
        self.solver = SolverSpace()
        self.cache = CacheSpace()

    def _cache_context(self, context: SpaceContext, steps: int | None = None) -> SpaceContext:
        return context.replace(num_inference_steps=steps if steps is not None else context.nfe_range[1])

    def _split(self, params: Mapping[str, Any], context: SpaceContext) -> tuple[dict[str, Any], dict[str, Any]]:
        solver_names = {v.name for v in self.solver.variables(context)}
        cache_names = {v.name for v in self.cache.variables(self._cache_context(context))}
        solver = {k: v for k, v in params.items() if k in solver_names}
        cache = {k: v for k, v in params.items() if k in cache_names}
        return solver, cache

    def variables(self, context: SpaceContext) -> list[Variable]:
        if context.nfe_range[1] < 2:
            raise SpaceError(f"space 'joint': needs an NFE range reaching at least 2, got {context.nfe_range}")
        return [
            *self.solver.variables(context),
            Variable("dc_ratio", "float", *DC_RANGE, default=1.0, help="DC-Solver ratio of steps 3 … n−1"),
            Variable("dc_last", "float", *DC_RANGE, default=1.0, help="DC-Solver ratio of the last step"),
            Variable("use_cache", "bool", default=False, help="reuse cached block outputs between the evaluations"),
            *self.cache.variables(self._cache_context(context)),
        ]

    def _repair(self, params: dict[str, Any], context: SpaceContext) -> list[str]:
        solver, cache = self._split(params, context)
        fixed = self.solver.repair(solver, context)
        params.update(fixed.params)
        changes = list(fixed.changes)
        n = int(params["nfe"])
        if params["use_cache"] and n < 2:
            params["use_cache"] = False
            changes.append(f"use_cache: {n} evaluation(s) leave nothing to reuse; set to False")
        if params["use_cache"]:
            repaired = self.cache.repair(cache, self._cache_context(context, n))
            params.update(repaired.params)
            changes += [f"{c} (at nfe {n})" for c in repaired.changes]
        return changes

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
        if params["use_cache"]:
            n = int(params["nfe"])
            sections.update(self.cache._decode(cache, self._cache_context(context, n)))
        return sections

    def encode(self, sections: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """Parameters of a solver schedule (and a cache mask over its steps, if given)."""
        extra = sorted(k for k, v in sections.items() if k not in ("solver", "cache") and v is not None)
        if extra:
            raise SpaceError(f"space 'joint' encodes only the solver and cache sections, got {extra}")
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
        cache = sections.get("cache")
        params["use_cache"] = cache is not None
        if cache is not None:
            n = int(params["nfe"])
            params.update(self.cache.encode({"cache": cache}, self._cache_context(context, n)))
        return params

    def baselines(self, context: SpaceContext) -> list[NamedPoint]:
        """The solver space's baselines (no cache) and the cache space's (on the pipeline's own scheduler)."""
        out = []
        defaults = self.default_params(context)
        for point in self.solver.baselines(context):
            params = None if point.params is None else {**defaults, **point.params, "use_cache": False}
            out.append(NamedPoint(point.name, point.sections, params, point.description))
        for point in self.cache.baselines(context):
            if point.name == "identity":
                continue  # the reference setting itself: no faster, nothing to compare
            out.append(NamedPoint(point.name, point.sections, None, point.description))
        return out

    def seeds(self, context: SpaceContext) -> list[NamedPoint]:
        """UniPC at its best spacing for NFE 4–6 with a light cache — every component reused at steps
        1, 4, 7, … (interval 2, refresh 3: at 4 evaluations step 1 only) — and a last-step DC ratio
        of 1.15.

        Measured on the embedded model (50-step reference): reusing every block's output at step 1
        of a 4-step schedule cut its FLOPs by 24 % for 1.2 dB PSNR, reusing at step 3 cost 6 dB,
        and a last-step ratio of 1.2 gained 0.5 dB — so these are promising starts the searcher
        refines (interval, warm-up, components, ratios), not settings anyone ships as they are.
        """
        lo, hi = context.nfe_range
        by_name = {p.name: p for p in self.solver.baselines(context)}
        cache_names = [v.name for v in self.cache.variables(self._cache_context(context))]
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
        return out
