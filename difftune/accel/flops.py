"""FLOPs a denoiser executes, counted by ``torch.utils.flop_counter`` (never by hand-written formulas)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["ComponentFlops", "component_flops", "count_flops"]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs executed by ``fn()`` (everything it runs, hooks included: a reused feature costs nothing)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class ComponentFlops:
    """FLOPs of one denoiser call, split by block and component slot.

    ``per_component[b, k]`` is what block ``b``'s slot ``k`` costs per call; ``total`` is the whole
    call (embeddings, norms, modulation and output head included), so a mask's FLOP-ideal speedup is
    ``total / (total - skipped)``.
    """

    total: int
    per_component: np.ndarray

    def schedule_flops(self, mask: np.ndarray) -> int:
        """FLOPs of a whole sampling run under ``mask`` (steps × blocks × components, True = recompute)."""
        mask = np.asarray(mask, dtype=bool)
        skipped = (~mask * self.per_component[None]).sum()
        return int(self.total * mask.shape[0] - skipped)

    def ideal_speedup(self, mask: np.ndarray) -> float:
        mask = np.asarray(mask, dtype=bool)
        return self.total * mask.shape[0] / self.schedule_flops(mask)


def component_flops(pipe: Any, call: Callable[[], Any]) -> ComponentFlops:
    """Count one denoiser call of ``call()`` (a pipeline call) per block and component slot."""
    from difftune.models import describe

    info = describe(pipe)
    denoiser = getattr(pipe, info.denoiser)
    prefix = type(denoiser).__name__
    captured: list[tuple[Any, Any]] = []

    def grab(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        captured.append((args, kwargs))
        raise _Captured

    handle = denoiser.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        call()
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the call never ran the denoiser")
    args, kwargs = captured[0]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        denoiser(*args, **kwargs)
    counts = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    per = np.zeros((len(info.blocks), len(info.components)), dtype=np.int64)
    for b, block in enumerate(info.block_info):
        for k, paths in enumerate(block.components):
            per[b, k] = sum(counts.get(f"{prefix}.{p}", 0) for p in paths)
    return ComponentFlops(total=counts.get(prefix, 0), per_component=per)


class _Captured(Exception):
    """Stops the pipeline once the first denoiser call's inputs are captured."""
