"""Model adapters: load a pipeline from a spec and describe its denoiser for the search."""

from __future__ import annotations

from typing import Any

from difftune.models._info import BlockInfo, ModelInfo, fingerprint
from difftune.models._load import (
    CHECKPOINT_SUFFIXES,
    KNOWN_MODELS,
    SINGLE_FILE_PIPELINES,
    KnownModel,
    is_available_locally,
    load_pipeline,
)
from difftune.models._registry import Adapter, adapter_for, adapters, register_adapter

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "KNOWN_MODELS",
    "SINGLE_FILE_PIPELINES",
    "Adapter",
    "BlockInfo",
    "KnownModel",
    "ModelInfo",
    "adapter_for",
    "adapters",
    "describe",
    "fingerprint",
    "is_available_locally",
    "load_pipeline",
    "register_adapter",
]


def describe(pipe: Any) -> ModelInfo:
    """Family, fingerprint, blocks (execution order) and cache component slots of ``pipe``.

    Example::

        >>> info = describe(load_pipeline("embedded"))
        >>> info.family, info.components, info.mask_shape(20)
        ('embedded', ('attn1', 'ff'), (20, 6, 2))
    """
    return adapter_for(pipe).describe(pipe)
