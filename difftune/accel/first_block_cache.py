"""First Block Cache: run the first block every step; when its residual barely moved, skip the rest.

The first block's output residual (output − input) is a cheap probe of how much this step's
features differ from the last fully computed step's (FBCache from ParaAttention, a simplification of
TeaCache). When the relative mean absolute change ``mean|r − r_prev| / mean|r_prev|`` is below
``threshold``, the remaining blocks are skipped and their cached residual (final block output −
first block output, from the last fully computed step) is added to this step's first-block output;
otherwise every block runs and both the probe and the residual are refreshed. ``r_prev`` is the
probe of the last *fully computed* step, so a run of skipped steps accumulates change until it
crosses the threshold.

Decisions and arithmetic match diffusers' ``apply_first_block_cache`` (``FirstBlockCacheConfig``),
except that a change exactly equal to the threshold recomputes here (so ``threshold=0`` never skips)
and that the last block of SD3, which returns no text stream, is supported.

    >>> import difftune
    >>> pipe = difftune.load_pipeline("embedded")
    >>> handle = FirstBlockCacheConfig(threshold=0.1).apply(pipe)
    >>> images = pipe(prompt="digit 3", num_inference_steps=20).images
    >>> handle.remove()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from difftune.accel._fields import as_float, check_keys
from difftune.accel._hooks import CompositeHandle, Handle, StepTracker, wrap_forward
from difftune.accel.cache import CachePolicy, _batch_of, _resolve, register_policy
from difftune.errors import ProfileError

__all__ = ["FirstBlockCacheConfig"]

#: Blocks returning the image stream alone, and blocks returning ``(text stream, image stream)``.
_SINGLE_KINDS = ("transformer",)
_DUAL_KINDS = ("double", "single", "joint")

Streams = tuple[torch.Tensor, torch.Tensor | None]  # (image stream, text stream or None)


def _inputs(args: tuple, kwargs: dict, dual: bool) -> Streams:
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if not dual:
        return hidden, None
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    return hidden, text


def _split(out: Any, dual: bool) -> Streams:
    return (out[1], out[0]) if dual else (out, None)


def _join(hidden: torch.Tensor, text: torch.Tensor | None, dual: bool) -> Any:
    return (text, hidden) if dual else hidden


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else b + a


class _CallState:
    """One denoiser call's cache (conditional and unconditional passes never share one)."""

    def __init__(self) -> None:
        self.batch = -1
        self.probe: torch.Tensor | None = None  # first-block residual at the last full step
        self.head: Streams | None = None  # first-block output at the last full step
        self.tail: Streams | None = None  # final output − first-block output at the last full step
        self.skipping = False


class _FirstBlockCache:
    def __init__(self, threshold: float, tracker: StepTracker, dual: bool, last: int):
        self.threshold, self.tracker, self.dual, self.last = threshold, tracker, dual, last
        self.states: dict[int, _CallState] = {}

    def reset(self) -> None:
        self.states.clear()

    def relative_change(self, probe: torch.Tensor, previous: torch.Tensor) -> float:
        # Same reduction order as diffusers, so equal inputs give equal decisions.
        return ((probe - previous).abs().mean() / previous.abs().mean()).item()

    def head(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        state = self.states.setdefault(self.tracker.call, _CallState())
        hidden_in, _ = _inputs(args, kwargs, self.dual)
        out = forward(*args, **kwargs)
        hidden, text = _split(out, self.dual)
        probe = hidden - hidden_in
        batch = _batch_of(args, kwargs)
        tail = state.tail if state.batch == batch else None
        state.skipping = (
            tail is not None and state.probe is not None and self.relative_change(probe, state.probe) < self.threshold
        )
        if tail is not None and state.skipping:
            return _join(hidden + tail[0], _add(tail[1], text), self.dual)
        state.batch, state.probe, state.head, state.tail = batch, probe, (hidden, text), None
        return out

    def rest(self, index: int) -> Callable[..., Any]:
        def block(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            state = self.states.setdefault(self.tracker.call, _CallState())
            if state.skipping:
                return _join(*_inputs(args, kwargs, self.dual), self.dual)
            out = forward(*args, **kwargs)
            if index == self.last and state.head is not None:
                hidden, text = _split(out, self.dual)
                head_hidden, head_text = state.head
                state.tail = (hidden - head_hidden, None if text is None or head_text is None else text - head_text)
            return out

        return block


@register_policy("first_block_cache")
@dataclass(frozen=True)
class FirstBlockCacheConfig(CachePolicy):
    """First Block Cache (TeaCache-style adaptive skipping) for transformer denoisers.

    ``threshold`` trades speed for fidelity: the larger it is, the more steps reuse the cached
    residual of all blocks but the first (up to every step after the first), and the further the
    result drifts. 0 = the plain pipeline. Users report it is inert up to a model-specific value and
    a cliff just past it, which is why difftune tunes it per model. Works for the single-stream
    families (embedded, dit, pixart) and for Flux and SD3, whose blocks carry a text stream too.
    """

    threshold: float = 0.05

    def __post_init__(self) -> None:
        as_float(self.threshold, "cache.threshold", minimum=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "policy", "policy": "first_block_cache", "threshold": self.threshold}

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any]) -> FirstBlockCacheConfig:
        check_keys(data, {"kind", "policy", "threshold"}, "cache")
        return cls(threshold=as_float(data.get("threshold", 0.05), "cache.threshold", minimum=0.0))

    def apply(self, pipe: Any, *, strict: bool = True) -> Handle:
        """Install on ``pipe``'s transformer; works for any step count (``strict`` has nothing to check)."""
        info, denoiser = _resolve(pipe)
        kinds = {b.kind for b in info.block_info}
        dual = bool(kinds) and kinds <= set(_DUAL_KINDS)
        if not (dual or (kinds and kinds <= set(_SINGLE_KINDS))) or len(info.blocks) < 2:
            raise ProfileError(
                f"cache.policy: first_block_cache needs a transformer denoiser with at least two blocks "
                f"(families embedded, dit, pixart, flux, sd3), but this pipeline is the {info.family} family "
                f"({info.denoiser_class}); use deepcache or taylorseer"
            )
        tracker = StepTracker(denoiser, getattr(pipe, "scheduler", None))
        handle = CompositeHandle([Handle(tracker.remove)])
        cache = _FirstBlockCache(self.threshold, tracker, dual, last=len(info.blocks) - 1)
        tracker.add_listener(cache)
        handle.add(wrap_forward(denoiser.get_submodule(info.blocks[0]), cache.head))
        for index, name in enumerate(info.blocks[1:], start=1):
            handle.add(wrap_forward(denoiser.get_submodule(name), cache.rest(index)))
        return handle
