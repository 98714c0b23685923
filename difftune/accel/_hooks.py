"""Reversible forward wrapping and step tracking shared by the acceleration techniques.

A technique wraps a module's ``forward`` through :func:`wrap_forward`; the returned handle puts the
module back exactly as it was (the instance attribute is deleted, or the previous wrapper restored).
:class:`StepTracker` tells every hook which sampling step and which denoiser call of that step is
running, so that caches of the conditional and unconditional passes never mix.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CompositeHandle", "Handle", "StepTracker", "wrap_forward", "wrap_method"]

_MISSING = object()


class Handle:
    """Undoes one change. ``remove()`` is idempotent."""

    def __init__(self, undo: Callable[[], None]):
        self._undo: Callable[[], None] | None = undo

    @property
    def active(self) -> bool:
        return self._undo is not None

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()


class CompositeHandle(Handle):
    """Several handles undone in reverse order of application."""

    def __init__(self, handles: list[Handle] | None = None):
        self.handles: list[Handle] = list(handles or [])
        super().__init__(self._undo_all)

    def add(self, handle: Handle) -> Handle:
        self.handles.append(handle)
        return handle

    def _undo_all(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def wrap_method(obj: Any, name: str, wrapper: Callable[..., Any]) -> Handle:
    """Route ``obj.name(...)`` through ``wrapper(inner, *args, **kwargs)``; the handle restores it.

    ``inner`` is whatever the attribute was before (the class's method or an earlier wrapper), so
    wrappers stack; remove them in reverse order (a :class:`CompositeHandle` does). The instance
    attribute is deleted on removal when there was none, so the object is exactly as before.
    """
    previous = obj.__dict__.get(name, _MISSING)
    inner = getattr(obj, name)

    # functools.wraps keeps inspect.signature truthful: pipelines inspect forward / set_timesteps / step.
    @functools.wraps(inner)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return wrapper(inner, *args, **kwargs)

    setattr(obj, name, wrapped)

    def undo() -> None:
        if obj.__dict__.get(name) is not wrapped:
            raise RuntimeError(f"{type(obj).__name__}.{name} was re-wrapped after this hook; remove hooks in order")
        if previous is _MISSING:
            del obj.__dict__[name]
        else:
            setattr(obj, name, previous)

    return Handle(undo)


def wrap_forward(module: torch.nn.Module, wrapper: Callable[..., Any]) -> Handle:
    """:func:`wrap_method` on ``module.forward``."""
    return wrap_method(module, "forward", wrapper)


def _tensor_key(tensor: torch.Tensor) -> tuple[int, ...]:
    """Identifies a tensor's contents without reading them: the object (whoever keeps the key holds it too,
    so that its ``id`` is not reused), where its data starts, its length and its in-place version. A new
    tensor allocated where a freed one was gets another key."""
    return (id(tensor), tensor.data_ptr(), tensor.shape[0], tensor._version)


def _timestep_value(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if not value.numel():
            return math.nan
        return float((value if value.dim() == 1 else value.reshape(-1))[0].item())
    return float(value)


class StepTracker:
    """Counts sampling steps and the denoiser calls within each step.

    A step ends when the timestep given to the denoiser changes; a second call with the same
    timestep (pipelines that run the unconditional pass separately) is call 1 of the same step.
    Where the run began with the scheduler's ``set_timesteps`` and its timesteps are strictly
    decreasing, the step index is the timestep's position among them (counted from the run's
    first), so a step skipped without a denoiser call (SADA) still advances it. A new sampling run
    starts when the pipeline calls its scheduler's ``set_timesteps`` or the timestep goes up again;
    every listener's ``reset()`` then runs.
    """

    def __init__(self, denoiser: torch.nn.Module, scheduler: Any = None):
        self.denoiser = denoiser
        self.step = -1
        self.call = 0
        self.num_steps: int | None = None
        self._last_t: float | None = None
        self._fresh = True
        self._listeners: list[Any] = []
        self._on_calls: list[Callable[[StepTracker], None]] = []  # the listeners' ``on_call``, where defined
        self._t_index, self._t_name = self._find_timestep_argument(denoiser)
        self._scheduler = scheduler
        self._mirror: list[float] = []
        self._mirror_key: tuple[int, ...] | None = None
        self._keyed: dict[str, torch.Tensor] = {}  # the tensors the keys above name, held so their ids stay theirs
        self._positions: dict[float, int] = {}
        self._positions_key: tuple[int, ...] | None = None
        self._first_position: int | None = None
        self.handle = CompositeHandle([wrap_forward(denoiser, self._on_forward)])
        if scheduler is not None and hasattr(scheduler, "set_timesteps"):
            self.handle.add(self._wrap_set_timesteps(scheduler))

    @staticmethod
    def _find_timestep_argument(denoiser: torch.nn.Module) -> tuple[int | None, str]:
        params = list(inspect.signature(denoiser.forward).parameters)
        name = "timestep" if "timestep" in params else ("t" if "t" in params else "timestep")
        return (params.index(name) if name in params else None), name

    def _wrap_set_timesteps(self, scheduler: Any) -> Handle:
        def set_timesteps(inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            self.start_run(len(scheduler.timesteps))
            return out

        return wrap_method(scheduler, "set_timesteps", set_timesteps)

    def add_listener(self, listener: Any) -> None:
        """``listener.reset()`` runs at the start of every sampling run, and ``listener.on_call(tracker)``
        (where defined) before every denoiser call, once the step and call indices are updated."""
        self._listeners.append(listener)
        on_call = getattr(listener, "on_call", None)
        if on_call is not None:
            self._on_calls.append(on_call)

    def start_run(self, num_steps: int | None = None) -> None:
        self.num_steps = num_steps
        self._fresh = True
        self._last_t = None
        self.step = -1
        self.call = 0
        for listener in self._listeners:
            listener.reset()

    def _timestep(self, args: tuple, kwargs: dict) -> float:
        if self._t_name in kwargs:
            return self._value(kwargs[self._t_name])
        if self._t_index is not None and self._t_index < len(args):
            return self._value(args[self._t_index])
        return math.nan

    def _value(self, value: Any) -> float:
        """The timestep as a float, without a host↔device synchronisation where possible.

        Pipelines pass ``t`` (or ``t.expand(batch)``) from ``for t in scheduler.timesteps``: a view of the
        scheduler's timesteps tensor. On a GPU its value is then read from a CPU copy of that tensor, taken
        once per run, by the view's offset — reading it from the GPU would stall the launch queue at every
        denoiser call. Anything else (a scaled copy, a float) is read directly.
        """
        if isinstance(value, torch.Tensor) and not value.is_cpu and value.numel():
            mirror = self._timesteps_mirror(value)
            if mirror is not None:
                return mirror
        return _timestep_value(value)

    def _timesteps_mirror(self, value: torch.Tensor) -> float | None:
        timesteps = getattr(self._scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.device != value.device or timesteps.dim() != 1:
            return None
        same_storage = value.untyped_storage().data_ptr() == timesteps.untyped_storage().data_ptr()
        if value.dtype != timesteps.dtype or not same_storage or timesteps.stride(0) <= 0:
            return None
        offset = int(value.storage_offset()) - int(timesteps.storage_offset())
        index, rest = divmod(offset, int(timesteps.stride(0)))
        if rest or not 0 <= index < len(timesteps):
            return None
        key = _tensor_key(timesteps)
        if self._mirror_key != key:
            self._mirror = timesteps.detach().cpu().tolist()  # one synchronisation per run
            self._mirror_key = key
            self._keyed["mirror"] = timesteps
        return float(self._mirror[index])

    def _position(self, t: float) -> int | None:
        # Plain Python bookkeeping: traced, its dict would put a guard on every entry. Outside compilation
        # the disabling wrapper's own cost (a few µs a call) is skipped.
        if torch.compiler.is_compiling():
            return self._position_untraced(t)
        return self._find_position(t)

    @torch.compiler.disable
    def _position_untraced(self, t: float) -> int | None:
        return self._find_position(t)

    def _find_position(self, t: float) -> int | None:
        """Where ``t`` stands in the scheduler's timesteps (``t`` or ``t``·1000, as Flux pipelines pass
        it), when they are strictly decreasing — so each value names one step; None otherwise."""
        timesteps = getattr(self._scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1 or not len(timesteps) or math.isnan(t):
            return None
        if self.num_steps != len(timesteps):
            return None  # this run did not start from set_timesteps: the timesteps may not be its own
        key = _tensor_key(timesteps)
        if self._positions_key != key:
            values = [float(v) for v in timesteps.detach().cpu().tolist()]  # one synchronisation per run
            decreasing = all(a > b for a, b in itertools.pairwise(values))
            self._positions = {v: i for i, v in enumerate(values)} if decreasing else {}
            self._positions_key = key
            self._keyed["positions"] = timesteps
        found = self._positions.get(t)
        if found is None and self._positions:
            found = self._positions.get(float(torch.tensor(t * 1000.0, dtype=timesteps.dtype)))
        return found

    def _advance(self, t: float) -> None:
        """A new step: the next one, or further on when the scheduler's timesteps say that steps were
        skipped without a denoiser call (SADA skips whole steps; a cache mask must still index the
        scheduler's step, not the count of calls)."""
        step = self.step + 1
        position = self._position(t)
        if position is not None and self._first_position is not None:
            step = max(step, position - self._first_position)
        self.step, self.call = step, 0

    def _on_forward(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t = self._timestep(args, kwargs)
        last = self._last_t
        if self._fresh or last is None:
            if not self._fresh:
                self.start_run(None)
            self._fresh = False
            self.step, self.call = 0, 0
            self._first_position = self._position(t)
        elif t == last or (math.isnan(t) and math.isnan(last)):
            self.call += 1
        elif t < last or math.isnan(t):
            self._advance(t)
        else:  # the timestep went up: a new sampling run without set_timesteps
            self.start_run(None)
            self._fresh = False
            self.step, self.call = 0, 0
            self._first_position = self._position(t)
        self._last_t = t
        for on_call in self._on_calls:
            on_call(self)
        return forward(*args, **kwargs)

    def remove(self) -> None:
        self.handle.remove()
