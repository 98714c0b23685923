"""Wall-clock latency of a callable: CUDA events on a GPU, ``perf_counter`` on the CPU.

Measurements warm up first, repeat, and report the median and spread. :func:`measure_ab` alternates
two callables so that drift of the machine (thermal, other load) hits both sides alike; its ratio
is what a benchmark should print.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ABResult", "Latency", "measure", "measure_ab", "peak_memory_mb"]


@dataclass(frozen=True)
class Latency:
    """Median and spread of repeated timings, in milliseconds (``min_ms``: the fastest repeat)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    device: str
    min_ms: float = math.nan

    def statistic(self, name: str) -> float:
        """``"median"`` or ``"min"`` of the repeats (``"paired"``, a ratio statistic, reports the min)."""
        if name == "median":
            return self.median_ms
        if name in ("min", "paired"):
            return self.min_ms
        raise ValueError(f"latency statistic must be 'median', 'min' or 'paired', got {name!r}")

    @classmethod
    def from_samples(cls, samples_ms: list[float], device: str) -> Latency:
        ordered = sorted(samples_ms)

        def q(p: float) -> float:
            return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

        return cls(statistics.median(ordered), q(0.1), q(0.9), len(ordered), device, ordered[0])


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return float(start.elapsed_time(end))

        return cuda_time

    def cpu_time(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1000.0

    return cpu_time


def measure(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5, device: str | torch.device = "cpu") -> Latency:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones."""
    dev = torch.device(device)
    timer = _timer(dev)
    for _ in range(warmup):
        fn()
    return Latency.from_samples([timer(fn) for _ in range(repeats)], str(dev))


@dataclass(frozen=True)
class ABResult:
    """Two callables timed alternately; ``ratio`` = median(b) / median(a)."""

    a: Latency
    b: Latency
    #: the raw timings in the order they were taken: ``a_ms[i]`` and ``b_ms[i]`` ran back to back
    a_ms: tuple[float, ...] = ()
    b_ms: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        return self.b.median_ms / self.a.median_ms

    @property
    def speedup(self) -> float:
        """How many times faster b is than a (medians)."""
        return self.a.median_ms / self.b.median_ms

    def ratio_by(self, statistic: str) -> float:
        """b's latency ÷ a's: by ``"median"`` or ``"min"`` of each side's repeats, or ``"paired"``: the median
        of the back-to-back runs' ratios (see :meth:`speedup_by`)."""
        if statistic == "paired" and self.a_ms and len(self.a_ms) == len(self.b_ms):
            return statistics.median(b / a for a, b in zip(self.a_ms, self.b_ms, strict=True))
        return self.b.statistic(statistic) / self.a.statistic(statistic)

    def speedup_spread(self, statistic: str) -> float:
        """The timing noise of :meth:`speedup_by`, in × (the same unit as the speedup).

        ``"paired"``: half the interquartile range of the back-to-back ratios (half their whole range
        with fewer than 4 repeats). Otherwise: the speedup times the two sides' relative half-spreads
        (p10–p90) added in quadrature.
        """
        if statistic == "paired" and self.a_ms and len(self.a_ms) == len(self.b_ms):
            ratios = sorted(a / b for a, b in zip(self.a_ms, self.b_ms, strict=True))
            if len(ratios) >= 4:
                q1, _, q3 = statistics.quantiles(ratios, n=4)
                return (q3 - q1) / 2
            return (ratios[-1] - ratios[0]) / 2
        rel_a = (self.a.p90_ms - self.a.p10_ms) / (2 * self.a.median_ms)
        rel_b = (self.b.p90_ms - self.b.p10_ms) / (2 * self.b.median_ms)
        return self.speedup_by(statistic) * math.hypot(rel_a, rel_b)

    def speedup_by(self, statistic: str) -> float:
        """How many times faster b is than a: by ``"median"`` or ``"min"`` of each side's repeats, or
        ``"paired"``: the median of the ratios of runs taken back to back.

        On a CPU shared with other work, load changes within seconds; a ratio of two runs taken back
        to back sees the same load on both sides, so the median paired ratio is the robust estimate
        there (the fastest repeat of each side can catch quiet moments on one side only). On a
        dedicated GPU all three agree.
        """
        if statistic == "paired" and self.a_ms and len(self.a_ms) == len(self.b_ms):
            return statistics.median(a / b for a, b in zip(self.a_ms, self.b_ms, strict=True))
        return self.a.statistic(statistic) / self.b.statistic(statistic)


def measure_ab(
    fn_a: Callable[[], Any],
    fn_b: Callable[[], Any],
    *,
    warmup: int = 2,
    repeats: int = 7,
    device: str | torch.device = "cpu",
) -> ABResult:
    """Time ``fn_a`` and ``fn_b`` alternately (a, b, b, a, a, b, …) so that both see the same machine."""
    dev = torch.device(device)
    timer = _timer(dev)
    for _ in range(warmup):
        fn_a()
        fn_b()
    a_ms: list[float] = []
    b_ms: list[float] = []
    for i in range(repeats):
        order = ((fn_a, a_ms), (fn_b, b_ms)) if i % 2 == 0 else ((fn_b, b_ms), (fn_a, a_ms))
        for fn, out in order:
            out.append(timer(fn))
    return ABResult(
        Latency.from_samples(a_ms, str(dev)), Latency.from_samples(b_ms, str(dev)), tuple(a_ms), tuple(b_ms)
    )


def peak_memory_mb(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float | None:
    """Peak CUDA memory allocated while ``fn()`` runs, in MiB; ``None`` on the CPU (not measurable per call)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) / 2**20
