"""``evo``: USF's steady-state, per-NFE evolutionary search, behind difftune's ask/tell interface.

USF (thu-nics/USF, ``codebases/*/search.py``, ``utils/search_utils.py``, ``configs/evo_search.yml``;
TECHNIQUES.md §1) searches solver schedules with an evolution that never stops and has no
generations. Every ask:

1. draws an NFE uniformly from the ``nfe`` variable's range;
2. takes parents from the **top 15** archived results *at that NFE* (:data:`USF_DEFAULTS`);
3. **crossover** of two parents: every decision comes from either parent with p = 0.5, and every
   step's record (``step_i``) is swapped between them with p = 0.5;
4. **mutation**: insert a step (p = 0.2: NFE + 1, an ``auto`` step at a random place, later
   steps' overrides shift right), delete a step (p = 0.2), jitter each continuous timestep knob
   (p = 0.3, Gaussian with σ = 0.03 of its range: the reference jitters timesteps in [0, 1] with
   σ = 0.03), and redraw each other decision field (p = 0.3).

With fewer than two archived results at the drawn NFE the child is a mutated copy of the nearest
archived NFE's best, moved to the drawn NFE by deleting or inserting steps; with an empty archive, a
random point. The archive starts with whatever the study measured first — its baselines (the
reference's initial archive is the baseline solvers' decisions) — and holds every told or observed
result, so a resumed study rebuilds it from the store (:meth:`Searcher.restore`).

**Ranking** at one NFE: the reference scores by FID alone. Here a point's speed objectives
(``speedup``, ``latency_ms``, …) are nearly constant at one NFE — their differences are timing
noise — so only the *quality* objectives rank it: non-dominated sorting of the quality values, then,
within a front, the sum of the values standardised over the archive. Infeasible points (a
constraint above 0) rank after every feasible one. Without objective names every objective is used.

Variables are the space's: ``nfe`` and ``step_0 … step_k`` get the step-wise operators, any other
variable the per-decision ones; a space without ``nfe`` is one group. The child is clamped into
every variable's domain; the space's own repair does the rest.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from difftune.search._base import Proposal, Searcher, not_finite, outside, register_searcher

__all__ = ["SPEED_OBJECTIVES", "USF_DEFAULTS", "EvoSearcher"]

#: The reference's evolution settings (configs/evo_search.yml; TECHNIQUES.md §1).
USF_DEFAULTS: Mapping[str, float] = {
    "top_k": 15,
    "crossover_prob": 0.5,
    "swap_prob": 0.5,
    "insert_prob": 0.2,
    "delete_prob": 0.2,
    "jitter_prob": 0.3,
    "jitter_sigma": 0.03,
    "decision_prob": 0.3,
}
#: Objectives that measure speed or size, not quality: left out of the ranking at one NFE.
SPEED_OBJECTIVES = frozenset({"speedup", "latency_ms", "nfe", "throughput", "peak_memory_mb", "weight_memory_mb"})
_STEP = re.compile(r"^step_(\d+)$")


@dataclass
class _Result:
    params: dict[str, Any]
    quality: np.ndarray  # maximised: sign-flipped where the objective is minimised
    feasible: bool


class _Archive:
    """Every result, grouped by NFE, ranked by quality within a group."""

    def __init__(self, quality_index: Sequence[int], signs: np.ndarray) -> None:
        self.quality_index = list(quality_index)
        self.signs = signs
        self.groups: dict[int, list[_Result]] = {}

    def add(self, params: Mapping[str, Any], values: Sequence[float], constraints: Mapping[str, float] | None) -> None:
        q = np.asarray([float(values[i]) for i in self.quality_index]) * self.signs[self.quality_index]
        feasible = all(float(v) <= 0 for v in (constraints or {}).values())
        nfe = int(params.get("nfe", 0))
        self.groups.setdefault(nfe, []).append(_Result(dict(params), q, feasible))

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def _standardised(self) -> tuple[np.ndarray, np.ndarray]:
        every = np.stack([r.quality for g in self.groups.values() for r in g])
        return every.mean(axis=0), np.maximum(every.std(axis=0), 1e-12)

    def ranked(self, nfe: int) -> list[_Result]:
        """The group's results, best first."""
        group = self.groups.get(nfe, [])
        if len(group) < 2:
            return list(group)
        from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

        mean, std = self._standardised()
        order: list[_Result] = []
        for feasible in (True, False):
            members = [r for r in group if r.feasible is feasible]
            if not members:
                continue
            values = np.stack([r.quality for r in members])
            fronts = NonDominatedSorting().do(-values)  # pymoo minimises
            for front in fronts:
                score = ((values[front] - mean) / std).sum(axis=1)
                order += [members[i] for i in np.asarray(front)[np.argsort(-score)]]
        return order

    def score(self, quality: np.ndarray) -> float:
        """A scalar of quality values, standardised over the archive (larger is better)."""
        mean, std = self._standardised()
        return float(((quality - mean) / std).sum())


def _steps(variables: Mapping[str, Any]) -> list[str]:
    return sorted((n for n in variables if _STEP.match(n)), key=lambda n: int(_STEP.match(n).group(1)))  # type: ignore[union-attr]


class _Operators:
    """USF's operators over a space's variables (see the module docstring)."""

    def __init__(self, variables: Sequence[Any], settings: Mapping[str, float], rng: np.random.Generator) -> None:
        self.variables = {v.name: v for v in variables}
        self.settings = settings
        self.rng = rng
        self.steps = _steps(self.variables)
        self.nfe = self.variables.get("nfe")
        self.continuous = [v for v in variables if v.kind == "float"]
        self.decisions = [v for v in variables if v.kind != "float" and v.name != "nfe" and v.name not in self.steps]

    def random(self) -> dict[str, Any]:
        return {name: v.sample(self.rng) for name, v in self.variables.items()}

    def draw_nfe(self) -> int:
        if self.nfe is None:
            return 0
        return int(self.rng.integers(int(self.nfe.low), int(self.nfe.high) + 1))

    def crossover(self, a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
        p = self.settings["crossover_prob"]
        child = {k: (b[k] if k in b and self.rng.random() < p else a[k]) for k in a if k not in self.steps}
        swap = self.settings["swap_prob"]
        for name in self.steps:
            child[name] = b.get(name, a[name]) if self.rng.random() < swap else a[name]
        return child

    def _shift(self, params: dict[str, Any], at: int, insert: bool) -> None:
        """Insert an ``auto`` step record at ``at`` (later ones move right) or delete the one there."""
        names = self.steps
        values = [params[n] for n in names]
        if insert:
            values.insert(at, self.variables[names[at]].default)
            values = values[: len(names)]
        else:
            del values[at]
            values.append(self.variables[names[-1]].default)
        params.update(zip(names, values, strict=True))

    def resize(self, params: dict[str, Any], nfe: int) -> None:
        """Delete or insert steps at random places until the point has ``nfe`` steps."""
        if self.nfe is None:
            return
        while int(params["nfe"]) > nfe:
            if self.steps:
                self._shift(params, int(self.rng.integers(int(params["nfe"]))), insert=False)
            params["nfe"] = int(params["nfe"]) - 1
        while int(params["nfe"]) < nfe:
            if self.steps:
                self._shift(params, int(self.rng.integers(int(params["nfe"]) + 1)), insert=True)
            params["nfe"] = int(params["nfe"]) + 1

    def mutate(self, params: dict[str, Any]) -> dict[str, Any]:
        s, rng = self.settings, self.rng
        if self.nfe is not None:
            n = int(params["nfe"])
            if rng.random() < s["insert_prob"] and n < int(self.nfe.high):
                self.resize(params, n + 1)
            elif rng.random() < s["delete_prob"] and n > int(self.nfe.low):
                self.resize(params, n - 1)
        for v in self.continuous:
            if rng.random() < s["jitter_prob"]:
                lo, hi = v.bounds
                if v.log:
                    x = math.log(float(params[v.name])) + rng.normal(0, s["jitter_sigma"] * math.log(hi / lo))
                    params[v.name] = v.clamp(math.exp(x))
                else:
                    params[v.name] = v.clamp(float(params[v.name]) + rng.normal(0, s["jitter_sigma"] * (hi - lo)))
        active = self.steps[: int(params["nfe"])] if self.nfe is not None else self.steps
        for v in self.decisions + [self.variables[n] for n in active]:
            if rng.random() < s["decision_prob"]:
                params[v.name] = v.sample(rng)
        return {k: self.variables[k].clamp(v) if k in self.variables else v for k, v in params.items()}


@register_searcher("evo")
class EvoSearcher(Searcher):
    """USF's steady-state evolution; see the module docstring.

    Args:
        variables: the space's :class:`~difftune.spaces.Variable` s.
        directions: ``"minimize"`` / ``"maximize"`` per objective.
        seed: the evolution's random seed.
        storage, study_name: unused (the archive is rebuilt from the study by :meth:`restore`).
        objective_names: the objectives' names, to leave speed objectives out of the ranking.
        top_k, crossover_prob, swap_prob, insert_prob, delete_prob, jitter_prob, jitter_sigma,
            decision_prob: the reference's settings (:data:`USF_DEFAULTS`).
    """

    name = "evo"

    def __init__(
        self,
        variables: Sequence[Any],
        directions: Sequence[str],
        *,
        seed: int | None = None,
        storage: Any = None,
        study_name: str | None = None,
        objective_names: Sequence[str] | None = None,
        **settings: float,
    ) -> None:
        unknown = sorted(set(settings) - set(USF_DEFAULTS))
        if unknown:
            raise TypeError(f"unknown evo settings {unknown}; known: {', '.join(USF_DEFAULTS)}")
        self.variables = list(variables)
        self.directions = list(directions)
        self.settings = {**USF_DEFAULTS, **settings}
        self.rng = np.random.default_rng(seed)
        names = list(objective_names or [])
        quality = [i for i, n in enumerate(names) if n not in SPEED_OBJECTIVES] if names else []
        signs = np.asarray([1.0 if d == "maximize" else -1.0 for d in self.directions])
        self.archive = _Archive(quality or list(range(len(self.directions))), signs)
        self.ops = _Operators(self.variables, self.settings, self.rng)
        self._pending: dict[int, dict[str, Any]] = {}
        self._next = 0

    # ---- proposing ---------------------------------------------------------------------------

    def child(self, nfe: int | None = None) -> dict[str, Any]:
        """One offspring at ``nfe`` (drawn uniformly when None)."""
        ops, archive = self.ops, self.archive
        if not len(archive):
            return ops.random()
        nfe = ops.draw_nfe() if nfe is None else nfe
        parents = archive.ranked(nfe)[: int(self.settings["top_k"])]
        if len(parents) >= 2:
            i, j = self.rng.choice(len(parents), size=2, replace=False)
            params = ops.crossover(parents[i].params, parents[j].params)
        else:
            # Too few at this NFE: the nearest NFE's best (or the lone one here), moved to this NFE.
            nearest = min(archive.groups, key=lambda k: (abs(k - nfe), k))
            source = parents[0] if parents else archive.ranked(nearest)[0]
            params = dict(source.params)
            ops.resize(params, nfe)
        return ops.mutate(params)

    def ask(self) -> Proposal:
        params = self.child()
        number, self._next = self._next, self._next + 1
        self._pending[number] = params
        return Proposal(number, params)

    # ---- learning ----------------------------------------------------------------------------

    def tell(
        self,
        number: int,
        values: Sequence[float] | None,
        *,
        constraints: Mapping[str, float] | None = None,
        failure: str | None = None,
    ) -> None:
        params = self._pending.pop(number, None)
        if params is None or values is None or not_finite(values):
            return  # a failed point: the archive keeps results only
        self.archive.add(params, values, constraints)

    def fail(self, number: int, reason: str) -> None:
        self._pending.pop(number, None)

    def observe(
        self,
        params: Mapping[str, Any],
        values: Sequence[float],
        *,
        constraints: Mapping[str, float] | None = None,
        label: str | None = None,
    ) -> str | None:
        reason = not_finite(values) or outside(self.variables, params)
        if reason:
            return reason
        full = {v.name: v.canonical(params[v.name]) if v.name in params else v.default for v in self.variables}
        self.archive.add(full, values, constraints)
        return None
