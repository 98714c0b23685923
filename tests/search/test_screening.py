"""Multi-fidelity: candidates screened on a few samples, the best by Pareto rank measured in full."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import difftune
from difftune.search import run_study
from difftune.search.runner import SCREEN_RUNG, _screened_out
from difftune.store import MetricSpec, TrialState, get_store, parse_constraint

pytestmark = pytest.mark.usefixtures("one_thread")

#: Noise-free objectives (FLOPs, not timing): the same screening decisions on every machine.
OBJECTIVES = ["flops_ratio:min", "psnr", "class_accuracy"]
TINY = {"samples": 3, "num_inference_steps": 6, "latency_repeats": 1}


class _Trial:
    def __init__(self, trial_id: int, speedup: float, psnr: float):
        self.id = trial_id
        self._values = {"speedup": speedup, "psnr": psnr}

    def values(self, split: str = "calibration", rung: int = 0) -> dict[str, float]:
        return dict(self._values) if rung == SCREEN_RUNG else {}


def _job(points: dict[str, tuple[float, float]], eta: int = 3, constraints: tuple[str, ...] = ()) -> SimpleNamespace:
    trials = [_Trial(i, *p) for i, p in enumerate(points.values())]
    store = SimpleNamespace(list_trials=lambda study, states: trials)
    return SimpleNamespace(
        store=store,
        study=SimpleNamespace(id=1),
        specs=(MetricSpec.parse("speedup"), MetricSpec.parse("psnr")),
        constraints=tuple(parse_constraint(c) for c in constraints),
        screen=4,
        screen_eta=eta,
    )


# Fronts of the screened points: {A, B, C}, then D (dominated by A and B), then E (dominated by all).
SCREENED = {"A": (3.0, 30.0), "B": (2.0, 40.0), "C": (1.0, 50.0), "D": (2.0, 30.0), "E": (1.0, 20.0)}


@pytest.mark.parametrize(
    ("candidate", "eta", "better"),
    [
        ((4.0, 10.0), 3, 0),  # the fastest of all: first front
        ((2.5, 35.0), 3, 0),  # between A and B: first front
        ((2.0, 35.0), 3, 3),  # dominated by B only: second front, behind A, B, C (keep ⌈6/3⌉ = 2)
        ((1.5, 25.0), 3, 4),  # dominated by A, B and D: third front
        ((2.0, 35.0), 2, 3),  # eta 2 keeps ⌈6/2⌉ = 3: three better points are still too many
    ],
)
def test_a_candidate_goes_on_when_few_screened_points_lie_in_better_fronts(candidate, eta, better):
    job = _job({**SCREENED, "X": candidate}, eta=eta)
    reason = _screened_out(job, 5, {"speedup": candidate[0], "psnr": candidate[1]})
    keep = -(-6 // eta)
    if better < keep:
        assert reason is None
    else:
        assert reason == (
            f"screened out on 4 samples: {better} of 6 screened points lie in better fronts (the best 1/{eta}, "
            f"{keep}, go on)"
        )


def test_too_few_screened_points_or_a_missed_constraint():
    assert _screened_out(_job({"A": (3.0, 30.0), "X": (1.0, 1.0)}), 1, {"speedup": 1.0, "psnr": 1.0}) is None
    job = _job({**SCREENED, "X": (4.0, 10.0)}, constraints=("psnr>=20",))
    assert _screened_out(job, 5, {"speedup": 4.0, "psnr": 10.0}) == (
        "screened out on 4 samples: it misses a constraint there"
    )


def test_a_screened_study_measures_in_full_only_what_passed_the_screen(tmp_path, embedded_pipe):
    import optuna

    url = f"sqlite:///{tmp_path / 's.db'}"
    result = run_study(
        pipeline=embedded_pipe, budget=16, storage=url, study="s", objectives=OBJECTIVES, screen=1, seed=3, **TINY
    )
    assert result.finished == 16
    assert any(n.startswith("screening on 1 of 3 samples:") for n in result.notes)
    with get_store(url) as store:
        trials = store.list_trials("s")
        front_ids = {t.id for t in store.pareto_front("s")}
    names = {"flops_ratio", "psnr", "class_accuracy"}
    pruned = [t for t in trials if t.state is TrialState.PRUNED]
    complete = [t for t in trials if t.state is TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 16
    for trial in trials:  # every trial was screened: its figures on 1 sample are stored at rung -1
        assert names <= set(trial.values(rung=SCREEN_RUNG))
    for trial in pruned:
        assert trial.kind == "searched" and trial.values() == {} and trial.rungs == (SCREEN_RUNG,)
        assert trial.error.startswith("screened out on 1 samples:")
        assert trial.id not in front_ids
    for trial in complete:  # the hand-made points always go on; the full figures are rung 0
        assert names <= set(trial.values()) and trial.rungs == (SCREEN_RUNG, 0)
        # the screen measures the objectives only; the full evaluation the study's extras too
        assert "latency_ms" in trial.values() and "latency_ms" not in trial.values(rung=SCREEN_RUNG)
    assert {t.kind for t in complete} >= {"baseline", "searched"}
    # The front is the full figures' front: no pruned point, and what is on it is non-dominated at rung 0.
    assert front_ids <= {t.id for t in complete}
    # The searcher learnt that the screened-out points failed: Optuna never breeds from them.
    optuna_trials = optuna.load_study(study_name="difftune:s", storage=url).trials
    by_number = {t.number: t for t in optuna_trials}
    for trial in pruned:
        assert by_number[trial.config["searcher_number"]].state is optuna.trial.TrialState.FAIL

    # The screening is the study's: resuming with another one is refused; the same one resumes.
    with pytest.raises(difftune.DifftuneError, match="screen"):
        run_study(pipeline=embedded_pipe, budget=17, storage=url, study="s", objectives=OBJECTIVES, screen=2, **TINY)
    resumed = run_study(pipeline=embedded_pipe, budget=17, storage=url, study="s", objectives=OBJECTIVES, **TINY)
    assert resumed.finished == 17


def test_screening_needs_fewer_samples_than_the_full_evaluation(tmp_path, embedded_pipe):
    db = tmp_path / "never.db"
    with pytest.raises(difftune.DifftuneError, match="--screen 3: screening must use fewer samples"):
        run_study(pipeline=embedded_pipe, budget=2, storage=f"sqlite:///{db}", screen=3, **TINY)
    with pytest.raises(difftune.DifftuneError, match="--screen-eta"):
        run_study(pipeline=embedded_pipe, budget=2, storage=f"sqlite:///{db}", screen=1, screen_eta=1, **TINY)
    assert not db.exists()


def test_a_new_study_screens_by_its_spaces_default_unless_asked():
    from difftune.search.runner import _screen_samples
    from difftune.spaces import get_space

    ecad, cache = get_space("ecad"), get_space("cache")
    assert _screen_samples(ecad, None, 20) == 4  # the main job: ecad screens on 4 of 20 samples
    assert _screen_samples(ecad, None, 4) == 0  # too few samples to screen on fewer
    assert _screen_samples(ecad, 0, 20) == 0 and _screen_samples(ecad, 6, 20) == 6
    assert _screen_samples(cache, None, 20) == 0
