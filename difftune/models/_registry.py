"""Model adapters: one per family, registered by decorator, tried in registration order."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from difftune.errors import ModelError
from difftune.models._info import BlockInfo, ModelInfo, fingerprint

__all__ = ["Adapter", "adapter_for", "adapters", "register_adapter"]

_ADAPTERS: list[type[Adapter]] = []


class Adapter:
    """Finds a family's denoiser, its blocks in execution order and its cache components.

    Subclasses set :attr:`family`, :attr:`denoiser_attr`, :attr:`denoiser_classes`,
    :attr:`components` and :attr:`conditioning`, and implement :meth:`blocks`.
    """

    family: ClassVar[str]
    denoiser_attr: ClassVar[str] = "transformer"
    denoiser_classes: ClassVar[tuple[str, ...]] = ()
    components: ClassVar[tuple[str, ...]]
    conditioning: ClassVar[str] = "text"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        denoiser = getattr(pipe, cls.denoiser_attr, None)
        return denoiser is not None and type(denoiser).__name__ in cls.denoiser_classes

    @classmethod
    def denoiser(cls, pipe: Any) -> torch.nn.Module:
        return getattr(pipe, cls.denoiser_attr)

    @classmethod
    def blocks(cls, denoiser: Any) -> list[BlockInfo]:
        raise NotImplementedError

    @classmethod
    def branches(cls, denoiser: Any) -> tuple[tuple[str, str], ...]:
        return ()

    @classmethod
    def describe(cls, pipe: Any) -> ModelInfo:
        denoiser = cls.denoiser(pipe)
        blocks = cls.blocks(denoiser)
        scheduler = getattr(pipe, "scheduler", None)
        sched_cfg = getattr(scheduler, "config", {}) or {}
        name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
        return ModelInfo(
            family=cls.family,
            name=str(name or type(pipe).__name__),
            fingerprint=fingerprint(denoiser),
            denoiser=cls.denoiser_attr,
            denoiser_class=type(denoiser).__name__,
            blocks=tuple(b.name for b in blocks),
            components=cls.components,
            block_info=tuple(blocks),
            conditioning=cls.conditioning,
            scheduler=type(scheduler).__name__ if scheduler is not None else "",
            num_train_timesteps=sched_cfg.get("num_train_timesteps"),
            prediction_type=sched_cfg.get("prediction_type"),
            branches=cls.branches(denoiser),
        )


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` one of the adapters :func:`adapter_for` tries."""
    if any(a.family == cls.family for a in _ADAPTERS):
        raise ValueError(f"an adapter for family {cls.family!r} is already registered")
    _ADAPTERS.append(cls)
    return cls


def adapters() -> tuple[type[Adapter], ...]:
    import difftune.models.families  # noqa: F401  (importing it fills the registry)

    return tuple(_ADAPTERS)


def adapter_for(pipe: Any) -> type[Adapter]:
    """The adapter for ``pipe``'s family, or a :class:`ModelError` naming the supported families."""
    for adapter in adapters():
        if adapter.matches(pipe):
            return adapter
    families = ", ".join(a.family for a in adapters())
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    what = type(denoiser).__name__ if denoiser is not None else "no `transformer` or `unet` component"
    raise ModelError(f"difftune has no adapter for {type(pipe).__name__} ({what}); supported families: {families}")
