"""Δ-DiT: skip a contiguous range of transformer blocks and add back the range's cached deviation.

Δ-Cache (Chen et al., Δ-DiT, 2024) caches the *deviation* a block range makes to the residual
stream, Δ = range output − range input, rather than the output itself, so a skipped range still
passes the current step's input through: output = input + Δ. Δ-DiT observes that a DiT's front
blocks draw the outline and its rear blocks the details, and that early sampling steps settle the
outline while late steps refine detail. Before the switch step ``b`` it therefore skips the rear
blocks and from ``b`` on the front blocks. Every ``interval``-th step runs all blocks and refreshes
the deviations of both ranges.

    >>> import difftune
    >>> pipe = difftune.load_pipeline("embedded")
    >>> handle = DeltaDiTConfig(interval=2, switch_step=10, num_cached_blocks=2).apply(pipe)
    >>> images = pipe(prompt="digit 3", num_inference_steps=20).images
    >>> handle.remove()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from difftune.accel._fields import as_int, check_keys
from difftune.accel._hooks import CompositeHandle, Handle, StepTracker, wrap_forward
from difftune.accel.cache import CachePolicy, _batch_of, _resolve, register_policy
from difftune.errors import ProfileError

__all__ = ["DeltaDiTConfig"]


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@dataclass
class _CallState:
    """One denoiser call's cache: each range's input at this step and its deviation at the last full step."""

    batch: int = -1
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    skipping: bool = False


class _DeltaCache:
    """Shared by the wrappers of every block in the two ranges; one state per denoiser call of a step."""

    def __init__(self, config: DeltaDiTConfig, tracker: StepTracker, ranges: dict[str, range]):
        self.config, self.tracker, self.ranges = config, tracker, ranges
        self.states: dict[int, _CallState] = {}

    def reset(self) -> None:
        self.states.clear()

    def active(self) -> str:
        """The range a cached step skips: the rear blocks before the switch step, the front blocks from it on."""
        return "rear" if self.tracker.step < self.config.switch_step else "front"

    def wrapper(self, index: int) -> Callable[..., Any]:
        def block(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return self._block(index, forward, args, kwargs)

        return block

    def _block(self, index: int, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        step, call = self.tracker.step, self.tracker.call
        x = _hidden_states(args, kwargs)
        state = self.states.setdefault(call, _CallState())
        full = step % self.config.interval == 0
        name = self.active()
        span = self.ranges[name]
        if not full and index in span:
            if index == span.start:
                delta = state.deltas.get(name) if state.batch == _batch_of(args, kwargs) else None
                state.skipping = delta is not None
                if delta is not None:
                    return x + delta
            elif state.skipping:
                return x  # the range's first block already added the whole deviation
        out = forward(*args, **kwargs)
        if full:
            state.batch = _batch_of(args, kwargs)
            for key, r in self.ranges.items():
                if index == r.start:
                    state.inputs[key] = x
                if index == r.stop - 1 and key in state.inputs:
                    state.deltas[key] = out - state.inputs.pop(key)
        return out


@register_policy("delta_dit")
@dataclass(frozen=True)
class DeltaDiTConfig(CachePolicy):
    """Δ-DiT for single-stream DiTs (the embedded model, DiT, PixArt-α/Σ).

    Knobs and what they trade:

    - ``interval`` (N): every N-th step runs all blocks; in between one range of blocks is skipped.
      Larger N is faster and lets the cached deviation go stale for longer. 1 = the plain pipeline.
    - ``switch_step`` (b): steps before b skip the rear ``num_cached_blocks`` blocks (keeping the
      outline-forming front blocks fresh while the outline forms), steps from b on skip the front
      ones (keeping the detail-forming rear blocks fresh). 0 = always the front range; at least the
      step count = always the rear range.
    - ``num_cached_blocks``: the size of the skipped range. More blocks skip more FLOPs per cached
      step and approximate more of the network by a constant deviation.
    """

    interval: int = 2
    switch_step: int = 10
    num_cached_blocks: int = 4

    def __post_init__(self) -> None:
        as_int(self.interval, "cache.interval", minimum=1)
        as_int(self.switch_step, "cache.switch_step", minimum=0)
        as_int(self.num_cached_blocks, "cache.num_cached_blocks", minimum=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "policy",
            "policy": "delta_dit",
            "interval": self.interval,
            "switch_step": self.switch_step,
            "num_cached_blocks": self.num_cached_blocks,
        }

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any]) -> DeltaDiTConfig:
        check_keys(data, {"kind", "policy", "interval", "switch_step", "num_cached_blocks"}, "cache")
        return cls(
            interval=as_int(data.get("interval", 2), "cache.interval", minimum=1),
            switch_step=as_int(data.get("switch_step", 10), "cache.switch_step", minimum=0),
            num_cached_blocks=as_int(data.get("num_cached_blocks", 4), "cache.num_cached_blocks", minimum=1),
        )

    def apply(self, pipe: Any, *, strict: bool = True) -> Handle:
        """Install on ``pipe``'s transformer; works for any step count (``strict`` has nothing to check)."""
        info, denoiser = _resolve(pipe)
        if not info.block_info or any(b.kind != "transformer" for b in info.block_info):
            raise ProfileError(
                f"cache.policy: delta_dit needs a single-stream DiT (families embedded, dit, pixart), but this "
                f"pipeline is the {info.family} family ({info.denoiser_class}); use first_block_cache or taylorseer"
            )
        depth = len(info.blocks)
        if self.num_cached_blocks > depth:
            raise ProfileError(
                f"cache.num_cached_blocks: this {info.family} model has {depth} blocks, got {self.num_cached_blocks}"
            )
        ranges = {"front": range(0, self.num_cached_blocks), "rear": range(depth - self.num_cached_blocks, depth)}
        tracker = StepTracker(denoiser, getattr(pipe, "scheduler", None))
        handle = CompositeHandle([Handle(tracker.remove)])
        cache = _DeltaCache(self, tracker, ranges)
        tracker.add_listener(cache)
        for index, name in enumerate(info.blocks):
            if any(index in r for r in ranges.values()):
                handle.add(wrap_forward(denoiser.get_submodule(name), cache.wrapper(index)))
        return handle
