"""Small helpers the trainers (HarmoniCa's router, DC-Solver's ratios) share: cache keys, file names, outputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from difftune.errors import SpaceError

__all__ = ["jsonable", "positive_int", "prediction_tensor", "safe_name"]


def jsonable(value: Any) -> Any:
    """``value`` as JSON-able data for a cache key (arrays as lists, anything else as its repr)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)


def safe_name(text: str) -> str:
    """``text`` with every character but letters, digits and ``-_.`` replaced: a folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpaceError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


def prediction_tensor(output: Any, who: str) -> torch.Tensor:
    """The denoiser's prediction tensor (``.sample``, the first item of a tuple, or the tensor itself)."""
    if isinstance(output, torch.Tensor):
        return output
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SpaceError(f"{who}: cannot find the prediction tensor in the denoiser's {type(output).__name__} output")
