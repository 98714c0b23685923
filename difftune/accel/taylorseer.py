"""TaylorSeer: between full steps, forecast each component's output by a Taylor expansion in the step.

Plain reuse (FORA) returns a component's output from the last full step unchanged. TaylorSeer (Liu
et al., 2025) instead keeps finite-difference estimates of the output's derivatives with respect to
the step index and extrapolates: at step ``s``, with ``p`` the last full step and ``d = s − p``,

    y(s) ≈ Σ_{k=0..order} Δ^k y(p) · d^k / k!,     Δ^{k+1} y(p) = (Δ^k y(p) − Δ^k y(q)) / (p − q)

where ``q`` is the full step before ``p`` (orders grow as full steps accumulate). The components are
the same slots a cache mask uses (:attr:`difftune.models.BlockInfo.components`), so the cached value
is the component's output before the block's gating and residual add. Order 0 is exactly FORA.

The schedule is the reference's: the first ``warmup`` steps are full, then every ``interval``-th
step counted from the last warmup step (``warmup = 1`` gives steps 0, N, 2N, … like FORA). diffusers'
``TaylorSeerCacheConfig`` counts from ``disable_cache_before_step + 1`` instead; both schedules agree
when ``interval`` is 1 or 2, and there the two implementations give the same images.

    >>> import difftune
    >>> pipe = difftune.load_pipeline("embedded")
    >>> handle = TaylorSeerConfig(interval=4, order=2, warmup=3).apply(pipe)
    >>> images = pipe(prompt="digit 3", num_inference_steps=20).images
    >>> handle.remove()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from difftune.accel._fields import as_int, check_keys
from difftune.accel._hooks import CompositeHandle, Handle, StepTracker, wrap_forward
from difftune.accel.cache import CachePolicy, _batch_of, _resolve, register_policy

__all__ = ["TaylorSeerConfig"]


class _Forecast:
    """One component's Taylor factors for one denoiser call: per output tensor, [y, Δy, Δ²y, …] at step ``last``."""

    def __init__(self, batch: int, order: int):
        self.batch, self.order = batch, order
        self.last = -1  # the step of the last update; predict() is only called after one
        self.spec: Any = None
        self.leaves: list[Any] = []
        self.factors: list[list[torch.Tensor]] = []

    def update(self, step: int, output: Any) -> None:
        leaves, spec = pytree.tree_flatten(output)
        distance = step - self.last
        same_layout = self.last >= 0 and spec == self.spec and len(leaves) == len(self.leaves)
        factors: list[list[torch.Tensor]] = []
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                factors.append([])
                continue
            new = [leaf]
            previous = self.factors[i] if same_layout and distance > 0 else []
            for k in range(min(self.order, len(previous))):
                if previous[k].shape != new[k].shape:
                    break
                new.append((new[k] - previous[k]) / distance)
            factors.append(new)
        self.last, self.spec, self.leaves, self.factors = step, spec, leaves, factors

    def predict(self, step: int) -> Any:
        distance = step - self.last
        values = []
        for leaf, factors in zip(self.leaves, self.factors, strict=True):
            if len(factors) <= 1:
                values.append(leaf)  # order 0 (or a non-tensor leaf): plain reuse, the very same object
                continue
            # The same sum, in the same order, as diffusers' TaylorSeerState.predict.
            value = torch.zeros_like(factors[0])
            for k, factor in enumerate(factors):
                value = value + factor * (distance**k / math.factorial(k))
            values.append(value)
        return pytree.tree_unflatten(values, self.spec)


class _Schedule:
    def __init__(self, config: TaylorSeerConfig):
        self.config = config
        self.full = True

    def reset(self) -> None:
        pass

    def on_call(self, tracker: StepTracker) -> None:
        self.full = self.config.is_full_step(tracker.step)


class _TaylorComponent:
    """Wraps one component module: compute and refresh the factors on full steps, forecast on the others."""

    def __init__(self, tracker: StepTracker, schedule: _Schedule, order: int):
        self.tracker, self.schedule, self.order = tracker, schedule, order
        self.forecasts: dict[int, _Forecast] = {}

    def reset(self) -> None:
        self.forecasts.clear()

    def __call__(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        step, call, batch = self.tracker.step, self.tracker.call, _batch_of(args, kwargs)
        forecast = self.forecasts.get(call)
        if forecast is not None and forecast.batch != batch:
            forecast = None
        if not self.schedule.full and forecast is not None:
            return forecast.predict(step)
        out = forward(*args, **kwargs)
        if forecast is None:
            forecast = self.forecasts[call] = _Forecast(batch, self.order)
        forecast.update(step, out)
        return out


@register_policy("taylorseer")
@dataclass(frozen=True)
class TaylorSeerConfig(CachePolicy):
    """TaylorSeer: full compute every ``interval`` steps, Taylor-forecast component outputs in between.

    Knobs and what they trade:

    - ``interval`` (N): one full step in N after warm-up; the FLOP speedup approaches N while the
      forecast horizon (up to N − 1 steps) grows. 1 = the plain pipeline.
    - ``order``: Taylor order of the forecast. 0 reuses the last output (FORA); 1 extrapolates
      linearly, 2 quadratically. Higher orders track curved trajectories better over short horizons
      but amplify noise in the finite differences over long ones, and keep ``order + 1`` tensors per
      component in memory.
    - ``warmup``: the first steps that always compute (≥ 1). They build the derivative history
      (``order + 1`` full steps are needed before the forecast reaches its full order) and protect
      the early, fast-changing steps, at the cost of fewer skipped steps.
    """

    interval: int = 5
    order: int = 2
    warmup: int = 3

    def __post_init__(self) -> None:
        as_int(self.interval, "cache.interval", minimum=1)
        as_int(self.order, "cache.order", minimum=0, maximum=8)
        as_int(self.warmup, "cache.warmup", minimum=1)

    def is_full_step(self, step: int) -> bool:
        """Steps ``0 … warmup − 1``, then every ``interval``-th step counted from ``warmup − 1``."""
        return step < self.warmup or (step - self.warmup + 1) % self.interval == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "policy",
            "policy": "taylorseer",
            "interval": self.interval,
            "order": self.order,
            "warmup": self.warmup,
        }

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any]) -> TaylorSeerConfig:
        check_keys(data, {"kind", "policy", "interval", "order", "warmup"}, "cache")
        return cls(
            interval=as_int(data.get("interval", 5), "cache.interval", minimum=1),
            order=as_int(data.get("order", 2), "cache.order", minimum=0, maximum=8),
            warmup=as_int(data.get("warmup", 3), "cache.warmup", minimum=1),
        )

    def apply(self, pipe: Any, *, strict: bool = True) -> Handle:
        """Install on ``pipe``'s denoiser (any family); works for any step count (``strict`` has nothing to check)."""
        info, denoiser = _resolve(pipe)
        tracker = StepTracker(denoiser, getattr(pipe, "scheduler", None))
        handle = CompositeHandle([Handle(tracker.remove)])
        schedule = _Schedule(self)
        tracker.add_listener(schedule)
        for block in info.block_info:
            for paths in block.components:
                for path in paths:
                    component = _TaylorComponent(tracker, schedule, self.order)
                    tracker.add_listener(component)
                    handle.add(wrap_forward(denoiser.get_submodule(path), component))
        return handle
