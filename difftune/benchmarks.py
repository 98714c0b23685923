"""``difftune bench``: figures measured as ratios within one run (never absolute targets in tests).

Every figure compares two settings timed alternately on the same machine (see
:func:`difftune.evaluators.latency.measure_ab`), so a slow or busy machine changes both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["BENCHMARKS", "Figure", "run_benchmark"]


@dataclass(frozen=True)
class Figure:
    """One benchmark line: ``value`` against ``target`` (``"<= 1.03"`` style), with the raw timings."""

    name: str
    value: float
    target: str
    detail: str

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        op, bound = self.target.split()
        return self.value <= float(bound) if op == "<=" else self.value >= float(bound)


def _embedded(batch: int) -> tuple[Any, Callable[..., Any]]:
    from diffusers.utils import logging as diffusers_logging

    import difftune

    diffusers_logging.disable_progress_bar()
    pipe = difftune.load_pipeline("embedded")
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(batch)]

    def run(steps: int = 20) -> Any:
        return pipe(
            class_labels=labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt"
        )

    return pipe, run


def _skip_mask(shape: tuple[int, int, int], fraction: float) -> np.ndarray:
    """A mask reusing ``fraction`` of the block-component work: on a regular subset of steps after step 0,
    every component of every block reuses its cached output."""
    steps = shape[0]
    mask = np.ones(shape, dtype=bool)
    n_skip = round(fraction * steps)
    candidates = np.arange(1, steps)
    chosen = candidates[np.linspace(0, len(candidates) - 1, n_skip).round().astype(int)] if n_skip else []
    mask[chosen] = False
    return mask


def bench_runtime(repeats: int = 7, batch: int = 16) -> list[Figure]:
    """(a) an empty profile's overhead; (b) cache masks' realized ÷ FLOP-ideal speedup.

    Two copies of the embedded pipeline are loaded: one stays plain, the other carries the setting
    under test for the whole measurement, so applying it is never timed.
    """
    import difftune
    from difftune.accel.cache import CacheMaskConfig, apply_cache_schedule
    from difftune.accel.flops import component_flops
    from difftune.evaluators.latency import measure_ab
    from difftune.profile import ModelRef, Profile, ProfileContext

    steps = 20
    _, plain = _embedded(batch)
    tuned_pipe, tuned = _embedded(batch)
    info = difftune.describe(tuned_pipe)
    figures: list[Figure] = []

    empty = Profile(
        name="empty",
        model=ModelRef("embedded", info.family, info.fingerprint),
        context=ProfileContext(num_inference_steps=steps),
    )
    profile_handle = difftune.apply_profile(tuned_pipe, empty)
    ab = measure_ab(lambda: plain(steps), lambda: tuned(steps), repeats=repeats)
    profile_handle.remove()
    figures.append(
        Figure(
            "empty profile ÷ plain pipeline latency",
            ab.ratio,
            "<= 1.03",
            f"{ab.a.median_ms:.1f} ms vs {ab.b.median_ms:.1f} ms, batch {batch}, {steps} steps",
        )
    )

    flops = component_flops(tuned_pipe, lambda: tuned(steps))
    for fraction in (0.25, 0.5, 0.75):
        mask = _skip_mask(info.mask_shape(steps), fraction)
        block_share = (~mask * flops.per_component[None]).sum() / (flops.per_component.sum() * steps)
        ideal = flops.ideal_speedup(mask)
        handle = apply_cache_schedule(tuned_pipe, CacheMaskConfig.from_array(info.components, mask))
        ab = measure_ab(lambda: plain(steps), lambda: tuned(steps), repeats=repeats)
        handle.remove()
        figures.append(
            Figure(
                f"cache mask skipping {block_share:.0%} of block FLOPs: realized ÷ FLOP-ideal speedup",
                ab.speedup / ideal,
                ">= 0.9",
                f"realized {ab.speedup:.2f}× ({ab.a.median_ms:.0f} → {ab.b.median_ms:.0f} ms), FLOP-ideal {ideal:.2f}×",
            )
        )
    return figures


BENCHMARKS: dict[str, Callable[..., list[Figure]]] = {"runtime": bench_runtime}


def run_benchmark(name: str, **kwargs: Any) -> list[Figure]:
    from difftune.errors import DifftuneError

    if name not in BENCHMARKS:
        raise DifftuneError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](**kwargs)
