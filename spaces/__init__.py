"""difftune.spaces: one file per search space, each decoding a point to an acceleration config.

A space (:class:`Space`) lists its :class:`Variable` s for a model (:class:`SpaceContext`),
repairs any proposed point into a valid one, decodes it to profile sections, encodes known
settings back, and names its baselines (:class:`NamedPoint`). Spaces are registered by name::

    >>> from difftune.spaces import SpaceContext, get_space, spaces, to_profile
    >>> spaces()
    ('bac', 'cache', 'ecad', 'harmonica', 'joint', 'solver')
    >>> space = get_space("solver")
    >>> context = SpaceContext.from_pipeline(pipe, nfe_range=(3, 12))
    >>> sections = space.decode(space.default_params(context), context)
    >>> handle = difftune.apply_profile(pipe, to_profile(sections, context))

Importing this package never imports optuna or pymoo: :meth:`Variable.to_optuna_distribution`
and :meth:`Variable.to_pymoo_variable` import them when called.
"""

from __future__ import annotations

from ._base import NamedPoint, Repaired, Space, SpaceContext, Variable, get_space, register_space, spaces, to_profile
from ._spacing import (
    METHODS,
    SpacingChoice,
    baseline_schedule,
    best_spacing,
    clear_spacing_cache,
    default_spacing,
    spacing_candidates,
    spacing_table,
)
from .bac import (
    BACSpace,
    adaptive_caching_schedule,
    bac_mask,
    bubbling_union,
    clear_bac_cache,
    mean_pairwise_l1,
    schedule_value,
)
from .cache import CacheSpace, recompute_rows
from .dc import DCSpace
from .ecad import EcadSpace
from .harmonica import HarmoniCaSpace
from .joint import JointSpace
from .quant import QuantSpace
from .sada import SADASpace
from .solver import SolverSpace

__all__ = [
    "METHODS",
    "BACSpace",
    "CacheSpace",
    "DCSpace",
    "EcadSpace",
    "HarmoniCaSpace",
    "JointSpace",
    "NamedPoint",
    "QuantSpace",
    "Repaired",
    "SADASpace",
    "SolverSpace",
    "Space",
    "SpaceContext",
    "SpacingChoice",
    "Variable",
    "adaptive_caching_schedule",
    "bac_mask",
    "baseline_schedule",
    "best_spacing",
    "bubbling_union",
    "clear_bac_cache",
    "clear_spacing_cache",
    "default_spacing",
    "get_space",
    "mean_pairwise_l1",
    "recompute_rows",
    "register_space",
    "schedule_value",
    "spaces",
    "spacing_candidates",
    "spacing_table",
    "to_profile",
]
