"""pymoo's NSGA-II behind difftune's ask/tell interface, through pymoo's own ask/tell.

pymoo asks for a whole generation at a time (``algorithm.ask()``) and is told a whole generation
(``algorithm.tell(infills=pop)``); difftune asks for one point at a time. :class:`PymooSearcher` hands
out a generation's individuals one by one and tells pymoo once every one of them has a result.

- **Genome**: a space whose variables are all booleans (ECAD's cache genome) is searched as bits with
  ECAD's operators and defaults (TECHNIQUES.md §2: ``PointCrossover(n_points=4, prob=0.9)``,
  ``BitflipMutation(prob=0.05)`` — pymoo's meaning: the share of offspring mutated, each bit of a
  mutated offspring flipped with probability 1/n_var —, population 72, duplicates eliminated); any
  other space as real numbers in each variable's numeric bounds (:meth:`Variable.bounds`), with SBX
  and polynomial mutation, decoded by rounding (:meth:`Variable.from_number`).
- **Memoisation**: every result is kept by genome; an individual pymoo asks for again (a duplicate
  across generations, or a point a resumed study already measured — :meth:`restore`) is told its
  known result instead of being evaluated again.
- **Seeding**: points observed before the first ask (baselines, seeds, a resumed study's trials)
  are generation 0's first individuals, filled up to the population with random ones.
- **Constraints and failures**: pymoo minimises; maximised objectives are negated. The
  constraints' violations are summed into one inequality constraint; a failed point is infeasible
  by a large margin, so it never survives, and the search goes on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from difftune.search._base import Observation, Proposal, Searcher, not_finite, outside, register_searcher

__all__ = ["ECAD_DEFAULTS", "PymooSearcher"]

#: ECAD's NSGA-II settings (AniAggarwal/ecad, genetic/train_nsga2_base.py): population 72,
#: 4-point crossover with probability 0.9, bit-flip mutation of 5 % of the offspring.
ECAD_DEFAULTS: Mapping[str, Any] = {"population_size": 72, "crossover_prob": 0.9, "n_points": 4, "mutation_prob": 0.05}
#: The objective value and constraint violation a failed point is told (it never survives selection).
_FAILED = 1e12


@register_searcher("pymoo-nsga2", "pymoo")
class PymooSearcher(Searcher):
    """pymoo's NSGA-II (``pymoo.algorithms.moo.nsga2.NSGA2``) driven by ask/tell.

    Args:
        variables: the space's :class:`~difftune.spaces.Variable` s.
        directions: ``"minimize"`` / ``"maximize"`` per objective.
        seed: pymoo's and the initial sampling's seed.
        storage, study_name: unused (pymoo keeps no state of its own; :meth:`restore` rebuilds it).
        population_size: individuals per generation (default 72 for a bit genome, as ECAD; else 24).
        genome: ``"auto"`` (bits when every variable is a bool), ``"binary"`` or ``"real"``.
        crossover_prob, n_points, mutation_prob: the bit genome's operators (ECAD's defaults).
    """

    name = "pymoo-nsga2"

    #: a budget of at least this many generations of ECAD's population keeps ECAD's 72
    GENERATIONS = 4

    @classmethod
    def default_population(cls, budget: int) -> int | None:
        """The population a study of ``budget`` trials gets when none is asked for.

        ECAD's 72 (24 for a non-binary genome) when the budget holds :attr:`GENERATIONS` generations of
        72; below that ``budget // 4`` (at least 8), so that a short study evolves for four generations
        instead of spending its whole budget on generation 0 (60 trials: 15 a generation). None: the
        searcher's own default.
        """
        if budget >= cls.GENERATIONS * int(ECAD_DEFAULTS["population_size"]):
            return None
        return max(8, budget // cls.GENERATIONS)

    def __init__(
        self,
        variables: Sequence[Any],
        directions: Sequence[str],
        *,
        seed: int | None = None,
        storage: Any = None,
        study_name: str | None = None,
        population_size: int | None = None,
        genome: str = "auto",
        crossover_prob: float = ECAD_DEFAULTS["crossover_prob"],
        n_points: int = ECAD_DEFAULTS["n_points"],
        mutation_prob: float = ECAD_DEFAULTS["mutation_prob"],
    ) -> None:
        from difftune.errors import SpaceError

        self.variables = list(variables)
        if not self.variables:
            raise SpaceError("pymoo-nsga2: the space has no variables to search")
        self.directions = list(directions)
        self._signs = np.array([-1.0 if d == "maximize" else 1.0 for d in self.directions])
        binary = all(v.kind == "bool" for v in self.variables)
        if genome not in ("auto", "binary", "real"):
            raise SpaceError(f"pymoo-nsga2: genome must be 'auto', 'binary' or 'real', got {genome!r}")
        self.binary = binary if genome == "auto" else genome == "binary"
        if self.binary and not binary:
            raise SpaceError("pymoo-nsga2: a binary genome needs every variable to be a bool")
        if population_size is not None and (
            isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 2
        ):
            raise SpaceError(f"pymoo-nsga2: population_size must be an integer >= 2, got {population_size!r}")
        self.population_size = int(population_size or (ECAD_DEFAULTS["population_size"] if self.binary else 24))
        self.seed = seed
        self._options = {"crossover_prob": crossover_prob, "n_points": n_points, "mutation_prob": mutation_prob}
        self._rng = np.random.default_rng(seed)
        self._bounds = np.array([v.bounds for v in self.variables], dtype=float)
        #: genome key → (F, G) of every point told or observed: the memo
        self.archive: dict[tuple[float, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._observed: list[np.ndarray] = []  # genomes observed before the first generation
        self._late: list[np.ndarray] = []  # genomes observed later, merged into the next tell
        self._problem: Any = None
        self._algorithm: Any = None
        self._pop: Any = None  # the generation being evaluated
        self._queue: list[int] = []  # its individuals still to hand out
        self._open: dict[int, int] = {}  # proposal number → individual index
        self._counter = 0
        self.generations = 0

    # ---- encoding ---------------------------------------------------------------------------------

    def _genome(self, params: Mapping[str, Any]) -> np.ndarray:
        return np.array([v.to_number(params.get(v.name, v.default)) for v in self.variables], dtype=float)

    def _key(self, x: np.ndarray) -> tuple[float, ...]:
        # The decoded point is what was measured: genomes that round to the same point share a result.
        if self.binary:
            return tuple(float(b) for b in np.asarray(x, dtype=float) > 0.5)
        return tuple(v.to_number(v.from_number(float(value))) for v, value in zip(self.variables, x, strict=True))

    def _params(self, x: np.ndarray) -> dict[str, Any]:
        if self.binary:
            return {v.name: bool(value > 0.5) for v, value in zip(self.variables, x, strict=True)}
        return {v.name: v.from_number(float(value)) for v, value in zip(self.variables, x, strict=True)}

    def _result(self, values: Sequence[float] | None, constraints: Mapping[str, float] | None) -> tuple[Any, Any]:
        if values is None or not_finite(values):
            return np.full(len(self.directions), _FAILED), np.array([_FAILED])
        violation = sum(max(0.0, float(v)) for v in (constraints or {}).values())
        return self._signs * np.asarray(values, dtype=float), np.array([violation])

    # ---- pymoo ------------------------------------------------------------------------------------

    def _setup(self) -> None:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem

        n = len(self.variables)
        self._problem = Problem(
            n_var=n,
            n_obj=len(self.directions),
            n_ieq_constr=1,
            xl=self._bounds[:, 0],
            xu=self._bounds[:, 1],
            vtype=bool if self.binary else float,
        )
        seen: set[tuple[float, ...]] = set()
        first = []
        for x in self._observed:
            key = self._key(x)
            if key not in seen:
                seen.add(key)
                first.append(x)
        rows = first[: self.population_size]
        while len(rows) < self.population_size:
            rows.append(self._random())
        sampling = np.array(rows, dtype=bool if self.binary else float)
        if self.binary:
            from pymoo.operators.crossover.pntx import PointCrossover
            from pymoo.operators.mutation.bitflip import BitflipMutation

            crossover: Any = PointCrossover(n_points=self._options["n_points"], prob=self._options["crossover_prob"])
            mutation: Any = BitflipMutation(prob=self._options["mutation_prob"])
        else:
            from pymoo.operators.crossover.sbx import SBX
            from pymoo.operators.mutation.pm import PM

            crossover, mutation = SBX(prob=0.9, eta=15), PM(eta=20)
        self._algorithm = NSGA2(
            pop_size=self.population_size,
            sampling=sampling,
            crossover=crossover,
            mutation=mutation,
            eliminate_duplicates=True,
        )
        self._algorithm.setup(self._problem, termination=("n_gen", 10**9), seed=self.seed, verbose=False)

    def _random(self) -> np.ndarray:
        if self.binary:
            return self._rng.random(len(self.variables)) < 0.5
        low, high = self._bounds[:, 0], self._bounds[:, 1]
        return low + self._rng.random(len(self.variables)) * (high - low)

    def _next_generation(self) -> None:
        """Ask pymoo for a generation; individuals the memo knows get their result without an evaluation."""
        if self._algorithm is None:
            self._setup()
        while True:
            self._pop = self._algorithm.ask()
            self._results: list[tuple[Any, Any] | None] = []
            self._queue = []
            for index, x in enumerate(self._pop.get("X")):
                known = self.archive.get(self._key(np.asarray(x, dtype=float)))
                self._results.append(known)
                if known is None:
                    self._queue.append(index)
            if self._queue:
                return
            self._tell_generation()  # a fully memoised generation: straight on to the next

    def _tell_generation(self) -> None:
        from pymoo.core.evaluator import Evaluator
        from pymoo.core.population import Population
        from pymoo.problems.static import StaticProblem

        pop = self._pop
        results = [r for r in self._results if r is not None]
        F = np.array([r[0] for r in results])
        G = np.array([r[1] for r in results])
        if self._late:  # points observed since the last generation join the survival
            late = [x for x in self._late if self._key(x) in self.archive]
            extra = Population.new(X=np.array(late, dtype=pop.get("X").dtype))
            F = np.vstack([F, [self.archive[self._key(x)][0] for x in late]])
            G = np.vstack([G, [self.archive[self._key(x)][1] for x in late]])
            pop = Population.merge(pop, extra)
            self._late = []
        Evaluator().eval(StaticProblem(self._problem, F=F, G=G), pop)
        self._algorithm.tell(infills=pop)
        self.generations += 1
        self._pop = None

    # ---- the interface ----------------------------------------------------------------------------

    def ask(self) -> Proposal:
        if not self._queue:
            self._next_generation()
        index = self._queue.pop(0)
        number = self._counter
        self._counter += 1
        self._open[number] = index
        x = np.asarray(self._pop.get("X")[index], dtype=float)
        return Proposal(number=number, params=self._params(x), extra={"generation": self.generations})

    def tell(
        self,
        number: int,
        values: Sequence[float] | None,
        *,
        constraints: Mapping[str, float] | None = None,
        failure: str | None = None,
    ) -> None:
        index = self._open.pop(number, None)
        if index is None or self._pop is None:
            return  # a proposal of an earlier generation (or unknown): nothing waits for it
        result = self._result(values, constraints)
        x = np.asarray(self._pop.get("X")[index], dtype=float)
        self.archive[self._key(x)] = result
        self._results[index] = result
        if not self._queue and all(r is not None for r in self._results):
            self._tell_generation()

    def fail(self, number: int, reason: str) -> None:
        self.tell(number, None, failure=reason)

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
        missing = [v.name for v in self.variables if v.name not in params]
        if missing:
            return f"it sets no value for {', '.join(missing[:3])}{'…' if len(missing) > 3 else ''}"
        x = self._genome(params)
        self.archive[self._key(x)] = self._result(values, constraints)
        (self._observed if self._algorithm is None else self._late).append(x)
        return None

    def restore(self, history: Sequence[Observation]) -> list[str]:
        """Failed points are remembered too (as failed), so pymoo never asks for them again."""
        reasons = []
        for item in history:
            if item.values is None:
                if outside(self.variables, item.params) is None and all(v.name in item.params for v in self.variables):
                    self.archive[self._key(self._genome(item.params))] = self._result(None, None)
                continue
            reason = self.observe(item.params, item.values, constraints=item.constraints, label=item.label)
            if reason:
                reasons.append(f"{item.label or 'a stored point'}: {reason}")
        return reasons
