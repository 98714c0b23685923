"""Cache schedules: reuse a component's output from an earlier step instead of recomputing it.

A static schedule is a mask ``steps × blocks × components`` (1 = recompute, 0 = reuse that
component's cached output); ECAD, BAC and HarmoniCa all produce this form, and the hand-made
static policies (FORA) decode to it. The cached value is the component module's own output, i.e.
before the block's gating and residual add, so the residual stream stays fresh.

Where a step reuses every component of a transformer block, the block's forward is not run: its
output is rebuilt from the cached outputs and that step's gates (:mod:`difftune.accel._reused_blocks`),
bit-identical to running it with every component hooked but without its norms, the modulation of
the norms' outputs, or the calls into its components. A step that reuses every block chains these
fast paths (a replayed residual of the whole stack would not be bit-identical: the gates change
every step). UNet blocks, blocks of other classes and blocks another technique already wraps keep
the per-component hooks.

Reuse is per denoiser call of a step: a pipeline that runs the conditional and unconditional passes
in one batch caches both halves together; one that runs them as two calls gets two caches.

    >>> import difftune, numpy as np
    >>> pipe = difftune.load_pipeline("embedded")
    >>> info = difftune.describe(pipe)
    >>> mask = np.ones(info.mask_shape(20), dtype=bool); mask[1::2] = False   # recompute every other step
    >>> handle = apply_cache_schedule(pipe, CacheMaskConfig.from_array(info.components, mask))
    >>> images = pipe(prompt="digit 3", num_inference_steps=20).images
    >>> handle.remove()
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from difftune.accel._fields import as_int, as_str, check_keys, require
from difftune.accel._hooks import CompositeHandle, Handle, StepTracker, wrap_forward
from difftune.accel._registry import register_technique
from difftune.accel._reused_blocks import FALLBACK, FastPath, Shared, fast_path_for
from difftune.errors import ProfileError

__all__ = ["POLICIES", "CacheMaskConfig", "CachePolicy", "FORAConfig", "apply_cache_schedule", "register_policy"]


def _batch_of(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return -1


_MISS = object()


def _keep(out: Any, previous: Any) -> Any:
    """What a cache stores of a component's output ``out``: on the CPU, a copy into the buffers of the
    ``previous`` stored output (allocated once, then rewritten at every computed step), else ``out``.

    Holding the component's own output tensors from one computed step to the next makes every computed
    step allocate its activations around them, and glibc's malloc then hands memory back to the system
    and takes it again (page faults): on the embedded model computed steps under a mask cost ~16 % more
    than the plain pipeline's (19.4 vs 16.7 ms). Buffers that live as long as the schedule keep the
    plain pipeline's allocation pattern; the values are the same bits. A buffer is rewritten only while
    nothing else holds it (a reference or a view taken by other code): else a new one is made. On a GPU
    the caching allocator has no such cost, and the output is kept as it is."""
    if isinstance(out, torch.Tensor):
        if not out.is_cpu or out.requires_grad:
            return out
        if (
            isinstance(previous, torch.Tensor)
            and previous.shape == out.shape
            and previous.dtype == out.dtype
            and previous.stride() == out.stride()
            and previous.is_cpu
            and _unshared(previous)
        ):
            return previous.copy_(out)
        return out.clone(memory_format=torch.preserve_format)
    if type(out) is tuple:
        olds = previous if type(previous) is tuple and len(previous) == len(out) else (None,) * len(out)
        kept = []
        for i in range(len(out)):  # indexing, not zip: the reference counts below assume it
            kept.append(_keep(out[i], olds[i]))
        return tuple(kept)
    return out


#: References to a stored buffer while :func:`_unshared` checks it: the cache's ``spare`` local (or the
#: tuple holding it), :func:`_keep`'s ``previous`` argument, this function's argument and
#: ``sys.getrefcount``'s own.
_OWN_REFERENCES = 4


def _unshared(buffer: torch.Tensor) -> bool:
    """Nothing but the cache holds ``buffer``: no other Python reference, no view of its storage."""
    try:
        views = torch._C._storage_Use_Count(buffer.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):
        return False
    # 2: the tensor's own reference to its storage and the temporary storage object of the call above
    return buffer._base is None and views <= 2 and sys.getrefcount(buffer) <= _OWN_REFERENCES


class _ComponentCache:
    """Wraps one component module: recompute where its mask row says 1, else return the cached output."""

    def __init__(self, tracker: StepTracker, rows: np.ndarray):
        self.tracker = tracker
        # ``rows``: True where the step recomputes. Python lists, read at every call: whether a step reuses
        # the output, and whether it stores its own (only if some later step reuses it).
        self.reuse: list[bool] = np.logical_not(rows).tolist()
        reuse_later = np.logical_not(rows)[::-1].cumsum()[::-1]
        self.keep: list[bool] = (np.append(reuse_later[1:], 0) > 0).tolist()
        self.store: dict[int, tuple[int, Any]] = {}
        self.spare: dict[int, Any] = {}  # the last run's stored buffers, to be rewritten by this run's

    def reset(self) -> None:
        self.spare = {call: value for call, (_, value) in self.store.items()}
        self.store.clear()

    def stored(self, call: int, batch: int) -> Any:
        """The output stored for denoiser call ``call`` of the step at this batch size, or ``_MISS``."""
        hit = self.store.get(call)
        return hit[1] if hit is not None and hit[0] == batch else _MISS

    def __call__(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        tracker = self.tracker
        step = tracker.step
        in_schedule = 0 <= step < len(self.reuse)
        if in_schedule and self.reuse[step]:
            hit = self.stored(tracker.call, _batch_of(args, kwargs))
            if hit is not _MISS:
                return hit
        out = forward(*args, **kwargs)
        if in_schedule and self.keep[step]:
            call = tracker.call
            previous = self.store.pop(call, None)
            spare = previous[1] if previous is not None else self.spare.pop(call, None)
            del previous  # `spare` is now the only reference outside _keep (see _OWN_REFERENCES)
            self.store[call] = (_batch_of(args, kwargs), _keep(out, spare))
            del spare
        return out


class _ReusedBlock:
    """Wraps one block: where the step reuses every one of its components, return what the block would
    compute from the cached outputs (:class:`FastPath`) instead of running it.

    Which steps qualify is known from the mask; whether this call does is known only from the caches
    (a batch-size change, or a call with no cached counterpart, recomputes through the hooks). Torch
    hooks registered on a skipped component do not fire, as its ``forward`` is never entered."""

    def __init__(
        self,
        tracker: StepTracker,
        fast: FastPath,
        caches: dict[str, tuple[_ComponentCache, torch.nn.Module, Any]],
        reused: np.ndarray,
    ):
        self.tracker, self.fast = tracker, fast
        self.reused: list[bool] = reused.tolist()  # read at every call
        self.caches = tuple((child, *entry) for child, entry in caches.items())

    def __call__(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        tracker = self.tracker
        step = tracker.step
        if 0 <= step < len(self.reused) and self.reused[step]:
            batch = self.fast.batch(args, kwargs)
            call = tracker.call
            cached = {}
            for child, cache, module, installed in self.caches:
                # A component re-wrapped since (another technique outside the cache) must be entered; the
                # cache reuses its output at this step, as ``reused`` says.
                hit = cache.stored(call, batch) if module.__dict__.get("forward") is installed else _MISS
                if hit is _MISS:
                    break
                cached[child] = hit
            else:
                out = self.fast.run(cached, args, kwargs)
                if out is not FALLBACK:
                    return out
        return forward(*args, **kwargs)


def _install(
    tracker: StepTracker,
    handle: CompositeHandle,
    denoiser: torch.nn.Module,
    info: Any,
    rows_of: Callable[[int, int], np.ndarray],
) -> None:
    """Hook every component that some step reuses (``rows_of(block, slot)``: True = recompute), and
    give each block with fully reused steps its fast path where its class has one."""
    shared = Shared(tracker)
    for b, block in enumerate(info.block_info):
        caches: dict[str, tuple[_ComponentCache, torch.nn.Module, Any]] = {}
        reused: np.ndarray | None = None  # steps where every present component of the block is reused
        for k, paths in enumerate(block.components):
            if not paths:
                continue  # an inert slot: this block has no such component
            rows = rows_of(b, k)
            reused = ~rows if reused is None else reused & ~rows
            if rows.all():
                continue
            for path in paths:
                cache = _ComponentCache(tracker, rows)
                tracker.add_listener(cache)
                component = denoiser.get_submodule(path)
                handle.add(wrap_forward(component, cache))
                caches[path.removeprefix(block.name + ".")] = (cache, component, component.__dict__["forward"])
        if reused is None or not reused.any():
            continue
        module = denoiser.get_submodule(block.name)
        # A block already wrapped by another technique (first-block cache, Δ-DiT, SADA) must keep running
        # its wrapper: the fast path would bypass it.
        fast = None if "forward" in module.__dict__ else fast_path_for(module, frozenset(caches), shared)
        if fast is not None:
            handle.add(wrap_forward(module, _ReusedBlock(tracker, fast, caches, reused)))
            shared.stack.enlist(fast, reused)
            for extra in fast.install(first=b == 0):
                handle.add(extra)


class _StepCountCheck:
    """Fails (strict) or warns once when the pipeline runs another number of steps than the schedule has."""

    def __init__(self, steps: int, strict: bool, what: str):
        self.steps, self.strict, self.what = steps, strict, what
        self.warned = False

    def _mismatch(self, ran: str) -> None:
        message = (
            f"this profile's {self.what} was tuned for {self.steps} steps but the pipeline {ran}: call it with "
            f"num_inference_steps={self.steps} (the profile's context), or apply the profile with strict=False"
        )
        if self.strict:
            raise ProfileError(message)
        if not self.warned:
            warnings.warn(message + "; steps outside the schedule recompute everything", stacklevel=4)
            self.warned = True

    def reset(self) -> None:
        pass

    def on_call(self, tracker: StepTracker) -> None:
        if tracker.step == 0 and tracker.call == 0 and tracker.num_steps not in (None, self.steps):
            self._mismatch(f"set {tracker.num_steps} timesteps")
        elif tracker.step >= self.steps:
            self._mismatch(f"is running step {tracker.step + 1}")


def _resolve(pipe: Any) -> tuple[Any, torch.nn.Module]:
    from difftune.models import describe

    info = describe(pipe)
    return info, getattr(pipe, info.denoiser)


@register_technique("cache", "mask")
@dataclass(frozen=True)
class CacheMaskConfig:
    """A static cache schedule: ``mask[step][block][component]``, 1 = recompute, 0 = reuse.

    Each 0 saves that component's FLOPs at that step and costs the error of a stale feature; step 0
    always computes (there is nothing cached yet). An all-ones mask leaves the output bit-identical.
    ``components`` must equal :func:`difftune.describe`'s slots for the model it is applied to.
    """

    components: tuple[str, ...]
    mask: tuple[tuple[tuple[int, ...], ...], ...]
    section: ClassVar[str]
    kind: ClassVar[str]

    @classmethod
    def from_array(cls, components: tuple[str, ...] | list[str], mask: Any) -> CacheMaskConfig:
        array = np.asarray(mask)
        if array.ndim != 3 or array.shape[2] != len(components):
            raise ProfileError(
                f"cache.mask: expected steps × blocks × {len(components)} components, got shape {array.shape}"
            )
        rows = tuple(tuple(tuple(int(bool(v)) for v in comp) for comp in block) for block in array)
        return cls(components=tuple(components), mask=rows)

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.mask, dtype=bool).reshape(len(self.mask), -1, len(self.components))

    @property
    def num_steps(self) -> int:
        return len(self.mask)

    def resample(self, steps: int) -> CacheMaskConfig:
        """The schedule at another step count: step ``i`` of ``steps`` takes the row of the nearest step at
        the same fraction of the trajectory (``⌊i·(T−1)/(steps−1) + ½⌋``); step 0 computes everything.

        A schedule is tuned for its step count: measure the result before trusting it (``difftune export
        --steps`` does, on held-out samples).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ProfileError(f"cache.mask: cannot resample to {steps!r} steps; expected an integer >= 1")
        old = self.array
        if steps == len(old):
            return self
        span = max(len(old) - 1, 0)
        rows = [old[int(np.floor(i * span / (steps - 1) + 0.5))] if steps > 1 else old[0] for i in range(steps)]
        new = np.stack(rows).copy()
        new[0] = True
        return CacheMaskConfig.from_array(self.components, new)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "mask", "components": list(self.components), "mask": [[list(c) for c in b] for b in self.mask]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheMaskConfig:
        check_keys(data, {"kind", "components", "mask"}, "cache")
        components = require(data, "components", "cache")
        if not isinstance(components, list) or not components or not all(isinstance(c, str) for c in components):
            raise ProfileError(f"cache.components: expected a non-empty list of names, got {components!r}")
        mask = require(data, "mask", "cache")
        if not isinstance(mask, list) or not mask:
            raise ProfileError("cache.mask: expected a non-empty list (one matrix per step)")
        width = None
        for s, step in enumerate(mask):
            if not isinstance(step, list) or not step:
                raise ProfileError(f"cache.mask[{s}]: expected a list of blocks")
            width = width or len(step)
            if len(step) != width:
                raise ProfileError(f"cache.mask[{s}]: has {len(step)} blocks, step 0 has {width}")
            for b, row in enumerate(step):
                if not isinstance(row, list) or len(row) != len(components) or any(v not in (0, 1) for v in row):
                    raise ProfileError(
                        f"cache.mask[{s}][{b}]: expected {len(components)} values of 0 or 1, got {row!r}"
                    )
        return cls.from_array(components, mask)

    def apply(self, pipe: Any, *, strict: bool = True) -> Handle:
        return apply_cache_schedule(pipe, self, strict=strict)


def apply_cache_schedule(pipe: Any, config: CacheMaskConfig | CachePolicy, *, strict: bool = True) -> Handle:
    """Install a cache schedule on ``pipe``'s denoiser; ``handle.remove()`` restores it exactly."""
    info, denoiser = _resolve(pipe)
    if not isinstance(config, CacheMaskConfig):
        return config.apply(pipe, strict=strict)
    if tuple(config.components) != tuple(info.components):
        raise ProfileError(
            f"cache.components {list(config.components)} do not match this {info.family} model's slots "
            f"{list(info.components)}"
        )
    array = config.array
    if array.shape[1] != len(info.blocks):
        raise ProfileError(f"cache.mask has {array.shape[1]} blocks but this model has {len(info.blocks)}")
    tracker = StepTracker(denoiser, getattr(pipe, "scheduler", None))
    handle = CompositeHandle([Handle(tracker.remove)])
    tracker.add_listener(_StepCountCheck(array.shape[0], strict, "cache mask"))
    _install(tracker, handle, denoiser, info, lambda b, k: array[:, b, k])
    return handle


# --- named policies ------------------------------------------------------------------------------

POLICIES: dict[str, type[CachePolicy]] = {}
_MAX_STEPS = 10_000


def register_policy(name: str) -> Callable[[type[CachePolicy]], type[CachePolicy]]:
    """Class decorator: a cache policy serialised as ``{"kind": "policy", "policy": name, ...}``."""

    def decorate(cls: type[CachePolicy]) -> type[CachePolicy]:
        POLICIES[name] = cls
        cls.policy = name  # type: ignore[attr-defined]
        return cls

    return decorate


@register_technique("cache", "policy")
class CachePolicy:
    """Base of the named hand-made policies; ``from_dict`` dispatches on ``"policy"``."""

    policy: ClassVar[str]
    section: ClassVar[str]
    kind: ClassVar[str]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CachePolicy:
        name = as_str(require(data, "policy", "cache"), "cache.policy")
        if name not in POLICIES:
            raise ProfileError(f"cache.policy: unknown policy {name!r}; known policies: {', '.join(sorted(POLICIES))}")
        return POLICIES[name]._from_fields(data)

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any]) -> CachePolicy:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def apply(self, pipe: Any, *, strict: bool = True) -> Handle:
        raise NotImplementedError


@register_policy("fora")
@dataclass(frozen=True)
class FORAConfig(CachePolicy):
    """FORA: recompute every block's attention and MLP outputs every ``interval`` steps, reuse in between.

    ``interval`` = 1 is the plain pipeline; larger intervals skip ~(1 − 1/interval) of the block FLOPs
    and let features go stale for up to ``interval − 1`` steps.
    """

    interval: int = 2

    def to_mask(self, info: Any, num_steps: int) -> CacheMaskConfig:
        mask = np.zeros(info.mask_shape(num_steps), dtype=bool)
        mask[:: self.interval] = True
        return CacheMaskConfig.from_array(info.components, mask)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "policy", "policy": "fora", "interval": self.interval}

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any]) -> FORAConfig:
        check_keys(data, {"kind", "policy", "interval"}, "cache")
        return cls(interval=as_int(data.get("interval", 2), "cache.interval", minimum=1))

    def apply(self, pipe: Any, *, strict: bool = True) -> Handle:
        info, denoiser = _resolve(pipe)
        tracker = StepTracker(denoiser, getattr(pipe, "scheduler", None))
        handle = CompositeHandle([Handle(tracker.remove)])
        # The interval pattern does not depend on the step count: any num_inference_steps works.
        rows = np.arange(_MAX_STEPS) % self.interval == 0
        _install(tracker, handle, denoiser, info, lambda b, k: rows)
        return handle
