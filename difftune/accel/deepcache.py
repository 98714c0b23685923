"""DeepCache: between refresh steps a UNet reruns only a shallow skip branch and reuses its deep part.

A UNet's high-level features change slowly across steps while the shallow skip connections carry
the fresh detail (Ma et al., DeepCache, CVPR 2024). On a full step everything runs and the deep
modules' outputs are kept; on a cached step the deep modules return what they returned at the last
full step, so only the shallow branch — ``conv_in``, the shallow down layers, the shallow up layers
and ``conv_out`` — costs anything.

The branch follows the reference's ``cache_block_id`` / ``cache_layer_id`` (``cache_branch_id =
3 · block + layer`` for SD 1.5's three layers per block): ``branch`` picks the skip branch (an index
into :attr:`difftune.models.ModelInfo.branches`, 0 = shallowest down/up block pair), ``layer`` the
depth within it. Counting the branch's up block from its last layer (``r = 0``, the one fed by the
previous level's output) upwards, layer ℓ keeps the up layers ``r ≤ ℓ`` and the down layers
``< ℓ`` of the branch's down block fresh; everything deeper is reused: the branch's other down
layers (its downsampler always), the deeper down blocks (their whole output: hidden states and
residual tuple), the mid block and the up blocks before the branch's up block. ``layer=None`` is the
branch's deepest layer: the pair runs whole and only the levels below it are cached.

    >>> import difftune
    >>> pipe = difftune.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> handle = DeepCacheConfig(interval=3, branch=0, layer=0).apply(pipe)
    >>> images = pipe("a photo of a cat", num_inference_steps=50).images
    >>> handle.remove()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from difftune.accel._fields import as_float, as_int, as_str, check_keys
from difftune.accel._hooks import CompositeHandle, Handle, StepTracker, wrap_forward
from difftune.accel.cache import CachePolicy, _batch_of, _resolve, register_policy
from difftune.errors import ProfileError

__all__ = ["DeepCacheConfig", "nonuniform_full_steps"]

_SKIP_MODES = ("uniform", "non-uniform")
_UNET_FAMILIES = ("sd", "sdxl")


def nonuniform_full_steps(num_steps: int, interval: int, center: int, power: float) -> list[int]:
    """DeepCache's non-uniform refresh steps: ``ceil(num_steps / interval)`` full steps, denser near ``center``.

    Reproduces the reference's ``sample_from_quad_center`` exactly, including its use of the principal
    complex power of the negative end point (the real part is what the reference's ``np.int32`` keeps),
    and its retry with ``power − 0.02`` until the step count comes out right.

        >>> nonuniform_full_steps(50, 5, center=15, power=1.4)
        [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    """
    count = -(-num_steps // interval)
    if interval == 1 or count >= num_steps:
        return list(range(num_steps))
    p = power
    while p > 1:
        ends = np.linspace(complex(-center) ** (1 / p), complex(num_steps - center) ** (1 / p), count + 1)
        picked = np.unique(np.real(ends**p).astype(np.int32))[1:-1]
        steps = [0] + [int(v) + center for v in picked]
        if len(steps) == count:
            return steps
        p -= 0.02
    raise ProfileError(
        f"cache.center/cache.power: no non-uniform DeepCache schedule of {count} full steps out of {num_steps} "
        f"around center={center} with power<={power}; lower cache.center or raise cache.power"
    )


class _Refresh:
    """Decides, before each denoiser call, whether this step recomputes everything."""

    def __init__(self, config: DeepCacheConfig, tracker: StepTracker):
        self.config, self.tracker = config, tracker
        self.full = True
        self._steps: frozenset[int] | None = None

    def reset(self) -> None:
        self._steps = None

    def on_call(self, tracker: StepTracker) -> None:
        if self.config.skip_mode == "uniform":
            self.full = tracker.step % self.config.interval == 0
            return
        if self._steps is None:
            if tracker.num_steps is None:
                raise ProfileError(
                    "cache.skip_mode: non-uniform DeepCache needs the step count, but this pipeline did not call "
                    "scheduler.set_timesteps; use skip_mode='uniform'"
                )
            c = self.config
            self._steps = frozenset(nonuniform_full_steps(tracker.num_steps, c.interval, c.center, c.power))
        self.full = tracker.step in self._steps


class _Reuse:
    """Wraps one deep module: on a cached step, return its output from the last full step of the same call."""

    def __init__(self, refresh: _Refresh):
        self.refresh = refresh
        self.store: dict[int, tuple[int, Any]] = {}

    def reset(self) -> None:
        self.store.clear()

    def __call__(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call, batch = self.refresh.tracker.call, _batch_of(args, kwargs)
        if not self.refresh.full:
            hit = self.store.get(call)
            if hit is not None and hit[0] == batch:
                return hit[1]
        out = forward(*args, **kwargs)
        self.store[call] = (batch, out)
        return out


def _layers(block: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    return list(getattr(block, name, None) or ())


@register_policy("deepcache")
@dataclass(frozen=True)
class DeepCacheConfig(CachePolicy):
    """DeepCache for UNets (SD 1.x/2.x, SDXL): refresh every ``interval`` steps, reuse the deep features between.

    Knobs and what they trade:

    - ``interval`` (N): a full UNet pass every N steps; cached steps cost only the shallow branch, so
      the speedup approaches N while features go stale for up to N − 1 steps. 1 = the plain pipeline.
    - ``branch``: which skip branch stays fresh (0 = shallowest). A shallower branch caches more of
      the UNet — faster, but more of the output comes from stale features.
    - ``layer``: depth within the branch (``None`` = the whole down/up block pair runs). Smaller
      layers skip more of the branch's own blocks. On SD 1.5, ``(branch, layer)`` is the reference
      helper's ``cache_branch_id = 3 · branch + layer``, and its pipelines' ``cache_layer_id=k,
      cache_block_id=j`` is ``(k, j + 1)``, or ``(k + 1, 0)`` for ``j = 2`` (their README example,
      ``0, 0``, is ``branch=0, layer=1``).
    - ``skip_mode``: ``"uniform"`` refreshes at steps 0, N, 2N, …; ``"non-uniform"`` spreads the same
      number of full steps quadratically around step ``center`` (denser there, where the reference
      found features change fastest) with exponent ``power`` (> 1; larger = more concentrated).
    """

    interval: int = 3
    branch: int = 0
    layer: int | None = None
    skip_mode: str = "uniform"
    center: int = 15
    power: float = 1.4

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "policy",
            "policy": "deepcache",
            "interval": self.interval,
            "branch": self.branch,
            "layer": self.layer,
            "skip_mode": self.skip_mode,
            "center": self.center,
            "power": self.power,
        }

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any]) -> DeepCacheConfig:
        check_keys(data, {"kind", "policy", "interval", "branch", "layer", "skip_mode", "center", "power"}, "cache")
        layer = data.get("layer")
        return cls(
            interval=as_int(data.get("interval", 3), "cache.interval", minimum=1),
            branch=as_int(data.get("branch", 0), "cache.branch", minimum=0),
            layer=None if layer is None else as_int(layer, "cache.layer", minimum=0),
            skip_mode=as_str(data.get("skip_mode", "uniform"), "cache.skip_mode", _SKIP_MODES),
            center=as_int(data.get("center", 15), "cache.center", minimum=0),
            power=as_float(data.get("power", 1.4), "cache.power", minimum=1.0),
        )

    def cached_modules(self, pipe: Any) -> list[str]:
        """Module paths inside the UNet that return their last full-step output on cached steps."""
        return self._plan(pipe)[1]

    def _plan(self, pipe: Any) -> tuple[torch.nn.Module, list[str]]:
        info, unet = _resolve(pipe)
        if info.family not in _UNET_FAMILIES or not info.branches:
            raise ProfileError(
                f"cache.policy: deepcache needs a UNet ({', '.join(_UNET_FAMILIES)}), but this pipeline's denoiser is "
                f"{info.denoiser_class} (family {info.family}); use delta_dit, first_block_cache or taylorseer"
            )
        if self.branch >= len(info.branches):
            raise ProfileError(
                f"cache.branch: this {info.family} UNet has {len(info.branches)} skip branches "
                f"(0..{len(info.branches) - 1}), got {self.branch}"
            )
        down_name, up_name = info.branches[self.branch]
        down, up = unet.get_submodule(down_name), unet.get_submodule(up_name)
        ups = _layers(up, "resnets")
        layer = len(ups) - 1 if self.layer is None else self.layer
        if layer >= len(ups):
            raise ProfileError(
                f"cache.layer: branch {self.branch}'s up block {up_name} has {len(ups)} layers (0..{len(ups) - 1}), "
                f"got {layer}"
            )
        paths = [down for down, _ in info.branches[self.branch + 1 :]]
        paths += [b.name for b in info.block_info if b.kind == "mid"]
        paths += [up for _, up in reversed(info.branches[self.branch + 1 :])]
        # In the branch's down block, layer j feeds up layer r = j + 1: keep the layers below `layer`.
        for slot in ("resnets", "attentions"):
            paths += [f"{down_name}.{slot}.{j}" for j in range(layer, len(_layers(down, slot)))]
        paths += [f"{down_name}.downsamplers.{j}" for j in range(len(_layers(down, "downsamplers")))]
        # Up layer idx is r = len(ups) − 1 − idx counted from the block's end.
        for slot in ("resnets", "attentions"):
            paths += [f"{up_name}.{slot}.{i}" for i in range(len(_layers(up, slot))) if len(ups) - 1 - i > layer]
        return unet, paths

    def apply(self, pipe: Any, *, strict: bool = True) -> Handle:
        """Install on ``pipe``'s UNet; works for any step count (``strict`` has nothing to check)."""
        unet, paths = self._plan(pipe)
        tracker = StepTracker(unet, getattr(pipe, "scheduler", None))
        handle = CompositeHandle([Handle(tracker.remove)])
        refresh = _Refresh(self, tracker)
        tracker.add_listener(refresh)
        for path in paths:
            reuse = _Reuse(refresh)
            tracker.add_listener(reuse)
            handle.add(wrap_forward(unet.get_submodule(path), reuse))
        return handle


def _validate(config: DeepCacheConfig) -> None:
    as_int(config.interval, "cache.interval", minimum=1)
    as_int(config.branch, "cache.branch", minimum=0)
    if config.layer is not None:
        as_int(config.layer, "cache.layer", minimum=0)
    as_str(config.skip_mode, "cache.skip_mode", _SKIP_MODES)
    as_int(config.center, "cache.center", minimum=0)
    if as_float(config.power, "cache.power") <= 1:
        raise ProfileError(
            f"cache.power: must be > 1 (the reference lowers it by 0.02 while searching), got {config.power}"
        )
