"""The embedded model's digit classifier, loaded once per process for the metrics that use it."""

from __future__ import annotations

import functools

from torch import nn


@functools.lru_cache(maxsize=4)
def committed_classifier(path: str | None = None) -> nn.Module:
    """The committed digit classifier (or one saved at ``path``), in eval mode, shared by FID and class accuracy."""
    from difftune.models.embedded import load_classifier

    return load_classifier(path)
