"""difftune: automated search and autotuning of diffusion-model inference.

The names here are the serving-side runtime: importing difftune never imports optuna, pymoo,
sqlalchemy or streamlit.
"""

from __future__ import annotations

from difftune.errors import DifftuneError, EvaluationError, ModelError, ProfileError, SpaceError, StoreError
from difftune.models import ModelInfo, describe, load_pipeline
from difftune.profile import Profile, ProfileContext, ProfileHandle, apply_profile, load_profile
from difftune.tiers import TierBundle, TierSwitch, load_tiers

__version__ = "0.1.0"
__all__ = [
    "DifftuneError",
    "EvaluationError",
    "ModelError",
    "ModelInfo",
    "Profile",
    "ProfileContext",
    "ProfileError",
    "ProfileHandle",
    "SpaceError",
    "StoreError",
    "TierBundle",
    "TierSwitch",
    "__version__",
    "apply_profile",
    "describe",
    "load_pipeline",
    "load_profile",
    "load_tiers",
]
