"""difftune.search: searchers behind one ask/tell interface.

Importing this package does not import optuna or pymoo; a searcher imports its library when built.
"""

from difftune.search._base import Proposal, Searcher, get_searcher_class, register_searcher, searchers

__all__ = ["Proposal", "Searcher", "get_searcher_class", "register_searcher", "searchers"]
