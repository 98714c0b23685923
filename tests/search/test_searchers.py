"""Searchers behind ask/tell: seeding, failures, constraints, resume, and that they actually search."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

import difftune
from difftune.search import get_searcher_class, searchers


def _distributions():
    import optuna

    return {
        "x": optuna.distributions.FloatDistribution(0.0, 1.0),
        "y": optuna.distributions.FloatDistribution(-1.0, 1.0),
        "k": optuna.distributions.IntDistribution(1, 4),
    }


def _objectives(p):
    return [p["x"], (1 - p["x"]) ** 2 + p["y"] ** 2 + 0.01 * p["k"]]


class SearcherContract:
    sampler: str

    def make(self, **kwargs):
        return get_searcher_class(self.sampler)(
            _distributions(), ["minimize", "minimize"], sampler=self.sampler, seed=0, **kwargs
        )

    def test_points_evaluated_elsewhere_are_taken_or_the_reason_is_returned(self):
        searcher = self.make()
        assert searcher.add_completed({"x": 0.5, "y": 0.0, "k": 2}, [0.5, 0.3], baseline="b") is None
        assert len(searcher.study.trials) == 1
        assert "k=9 is outside the searched range" in searcher.add_completed({"x": 0.5, "y": 0.0, "k": 9}, [0.5, 0.3])
        assert "not finite" in searcher.add_completed({"x": 0.5, "y": 0.0, "k": 2}, [math.nan, 0.3])
        assert "x=1.5 is outside" in searcher.add_completed({"x": 1.5, "y": 0.0, "k": 2}, [0.5, 0.3])
        assert len(searcher.study.trials) == 1  # nothing else was added

    def test_proposals_stay_inside_the_distributions(self):
        searcher = self.make()
        for _ in range(12):
            p = searcher.ask()
            assert 0 <= p.params["x"] <= 1 and -1 <= p.params["y"] <= 1 and p.params["k"] in (1, 2, 3, 4)
            searcher.tell(p.number, _objectives(p.params))
        assert len(searcher.study.trials) == 12

    def test_enqueued_baselines_come_first(self):
        searcher = self.make()
        searcher.enqueue({"x": 0.5, "y": 0.0, "k": 2}, baseline="fora-2")
        searcher.enqueue({"x": 0.25, "y": 0.5, "k": 1}, baseline="fora-3")
        first, second = searcher.ask(), searcher.ask()
        assert (first.baseline, first.params["x"]) == ("fora-2", 0.5)
        assert (second.baseline, second.params["y"]) == ("fora-3", 0.5)

    def test_failures_and_nan_are_failed_trials_and_the_search_goes_on(self):
        import optuna

        searcher = self.make()
        a = searcher.ask()
        searcher.tell(a.number, None, failure="EvaluationError: NaN in images")
        b = searcher.ask()
        searcher.tell(b.number, [math.nan, 1.0])
        c = searcher.ask()
        searcher.tell(c.number, _objectives(c.params))
        states = [t.state for t in searcher.study.trials]
        assert states == [optuna.trial.TrialState.FAIL] * 2 + [optuna.trial.TrialState.COMPLETE]
        assert searcher.study.trials[0].user_attrs["difftune:failure"].startswith("EvaluationError")

    def test_constraints_are_recorded_for_the_sampler(self):
        searcher = self.make()
        p = searcher.ask()
        searcher.tell(p.number, _objectives(p.params), constraints={"psnr>=30": 2.5})
        assert searcher.study.trials[0].constraints == {"psnr>=30": 2.5}

    def test_resume_from_storage(self, tmp_path):
        url = f"sqlite:///{tmp_path / 'optuna.db'}"
        first = self.make(storage=url, study_name="s")
        for _ in range(3):
            p = first.ask()
            first.tell(p.number, _objectives(p.params))
        second = self.make(storage=url, study_name="s")
        p = second.ask()
        assert p.number == 3 and len(second.study.trials) == 4


class TestNSGA2(SearcherContract):
    sampler = "nsga2"

    def test_it_searches_better_than_its_first_generation(self):
        """On a toy bi-objective problem, later proposals dominate more of the space than the first ones."""
        import numpy as np

        from difftune.store import hypervolume as compute_hypervolume

        searcher = self.make(population_size=8)
        points = []
        for _ in range(64):
            p = searcher.ask()
            values = _objectives(p.params)
            points.append(values)
            searcher.tell(p.number, values)
        ref = np.array([1.1, 2.1])
        early = compute_hypervolume(np.array(points[:8]), ref)
        late = compute_hypervolume(np.array(points[-8:]), ref)
        assert late > early


class TestTPE(SearcherContract):
    sampler = "tpe"


class TestRandom(SearcherContract):
    sampler = "random"


def test_unknown_searcher_lists_the_known_ones():
    with pytest.raises(difftune.SpaceError, match="known searchers: gp, nsga2, random, tpe"):
        get_searcher_class("cmaes-ish")
    assert set(searchers()) >= {"nsga2", "tpe", "gp", "random"}


def test_importing_search_does_not_import_optuna():
    code = "import sys, difftune.search; print('optuna' in sys.modules, 'pymoo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
