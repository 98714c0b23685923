"""difftune.search: searchers behind one ask/tell interface, and the study runner that drives them.

Importing this package does not import optuna or pymoo; a searcher imports its library when built,
and :func:`run_study` when called.
"""

from difftune.search._base import (
    Observation,
    Proposal,
    Searcher,
    get_searcher_class,
    make_searcher,
    register_searcher,
    searchers,
)
from difftune.search.runner import RunProgress, RunResult, default_study_name, run_study

__all__ = [
    "Observation",
    "Proposal",
    "RunProgress",
    "RunResult",
    "Searcher",
    "default_study_name",
    "get_searcher_class",
    "make_searcher",
    "register_searcher",
    "run_study",
    "searchers",
]
