"""``s3``: S³'s predictor-guided solver search — USF's evolution, with a learnt predictor choosing what to evaluate.

S³ (the USF paper's search) adds light predictors that rank candidate schedules so that only
promising ones cost an evaluation. The paper describes the predictor but its code is not released
(TECHNIQUES.md §1), so this is the closest real thing, on difftune's ask/tell interface:

- **candidates**: each ask generates ``candidates`` offspring with :class:`~difftune.search.evo.EvoSearcher`'s
  operators (USF's crossover and mutations, parents from the top 15 at each drawn NFE);
- **predictor**: a scikit-learn random forest (``n_estimators=100``, refitted whenever new results
  arrived) maps a point's encoding — numbers scaled to [0, 1], categoricals one-hot — to its
  standardised quality (the archive's ranking score: quality objectives only, as ``evo`` ranks);
- **choice**: as in ``evo``, each ask draws one NFE; all candidates are at that NFE (a child whose
  mutation inserted or deleted a step gets one deleted or inserted elsewhere), so their predictions
  compare like for like, and the one with the best predicted quality is evaluated (ties: the
  earlier). Comparing candidates of different NFEs against their NFE's best would favour the
  weakest NFE, since a forest's predictions regress to the mean;
- **stages**: until ``warmup`` results are archived (baselines included) the predictor has too
  little to learn from and ``s3`` is ``evo``; then the candidate pool grows in stages —
  ``candidates`` × 1, × 2, × 4 at 1×, 2×, 4× ``warmup`` results — so the predictor screens more as
  it becomes more reliable. Only the chosen candidate is ever evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from difftune.search._base import Proposal, register_searcher
from difftune.search.evo import EvoSearcher

__all__ = ["S3Searcher"]


class _Encoder:
    """A point as a feature vector: numbers scaled into [0, 1], categoricals and bools one-hot."""

    def __init__(self, variables: Sequence[Any]) -> None:
        self.variables = list(variables)

    def __call__(self, params: Mapping[str, Any]) -> np.ndarray:
        out: list[float] = []
        for v in self.variables:
            value = params.get(v.name, v.default)
            if v.kind in ("int", "float"):
                lo, hi = v.bounds
                x = v.to_number(value)
                if v.log:
                    x, lo, hi = float(np.log(x)), float(np.log(lo)), float(np.log(hi))
                out.append((x - lo) / (hi - lo) if hi > lo else 0.0)
            else:
                index = int(v.to_number(value))
                out += [1.0 if i == index else 0.0 for i in range(len(v.choices))]
        return np.asarray(out)


@register_searcher("s3")
class S3Searcher(EvoSearcher):
    """S³: evolutionary candidates ranked by a learnt predictor; see the module docstring.

    Args:
        candidates: offspring generated per ask in the first stage (default 32).
        warmup: archived results before the predictor takes over, and the stage length (default 12).
        (the rest as :class:`~difftune.search.evo.EvoSearcher`)
    """

    name = "s3"

    def __init__(
        self,
        variables: Sequence[Any],
        directions: Sequence[str],
        *,
        seed: int | None = None,
        storage: Any = None,
        study_name: str | None = None,
        objective_names: Sequence[str] | None = None,
        candidates: int = 32,
        warmup: int = 12,
        **settings: float,
    ) -> None:
        super().__init__(
            variables,
            directions,
            seed=seed,
            storage=storage,
            study_name=study_name,
            objective_names=objective_names,
            **settings,
        )
        if candidates < 1 or warmup < 2:
            raise ValueError(f"s3: candidates >= 1 and warmup >= 2 needed, got {candidates}, {warmup}")
        self.candidates = int(candidates)
        self.warmup = int(warmup)
        self.encode = _Encoder(self.variables)
        self._model: Any = None
        self._trained_on = -1
        #: Per ask: (pool size, predicted gain of the chosen candidate over its NFE's best) — None while warming up.
        self.log: list[tuple[int, float] | None] = []

    def pool_size(self) -> int:
        """Candidates generated for the next ask: 0 while warming up, then growing in stages."""
        n = len(self.archive)
        if n < self.warmup:
            return 0
        stage = min(int(np.log2(n / self.warmup)), 2)
        return self.candidates * 2**stage

    def _fit(self) -> Any:
        from sklearn.ensemble import RandomForestRegressor

        n = len(self.archive)
        if self._model is not None and self._trained_on == n:
            return self._model
        results = [r for group in self.archive.groups.values() for r in group]
        x = np.stack([self.encode(r.params) for r in results])
        y = np.asarray([self.archive.score(r.quality) if r.feasible else -1e3 for r in results])
        seed = int(self.rng.integers(2**31))
        self._model = RandomForestRegressor(n_estimators=100, random_state=seed).fit(x, y)
        self._trained_on = n
        return self._model

    def ask(self) -> Proposal:
        size = self.pool_size()
        if size == 0:
            self.log.append(None)
            return super().ask()
        model = self._fit()
        nfe = self.ops.draw_nfe()
        pool = []
        for _ in range(size):
            params = self.child(nfe)
            self.ops.resize(params, nfe)  # an inserted step moved elsewhere, or a deleted one re-added
            pool.append(params)
        predicted = model.predict(np.stack([self.encode(p) for p in pool]))
        best = [r for r in self.archive.ranked(nfe) if r.feasible][:1]
        incumbent = self.archive.score(best[0].quality) if best else -np.inf
        choice = int(np.argmax(predicted))
        self.log.append((size, float(predicted[choice] - incumbent)))
        number, self._next = self._next, self._next + 1
        self._pending[number] = pool[choice]
        return Proposal(number, pool[choice])
