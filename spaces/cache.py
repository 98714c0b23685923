"""The ``cache`` space: structured cache schedules that decode to a steps × blocks × components mask.

ECAD searches the raw mask (``ecad`` space: 1,680 bits for PixArt); most of those bits are noise to
a sampler such as TPE. This space describes the schedules people actually write — FORA's "every
N steps", Δ-DiT's "front and rear blocks on different schedules", "cache the MLP but not the
attention", "recompute everything now and then" — with a handful of integers and booleans, and
decodes them to the same :class:`~difftune.accel.CacheMaskConfig` (profile section ``cache``).

Parametrisation, with the denoiser's blocks split into G contiguous groups in execution order
(G = 2–4, about √depth: 2 for the embedded model's 6 blocks, 4 for PixArt's 28):

- per group g:

  - ``interval_g`` (1 … ``max_interval``): a cached component is recomputed once its cached
    output is ``interval_g`` steps old (1 = every step, i.e. not cached);
  - ``warmup_g`` (0 … steps/2): the group's first steps are always computed (features change
    fastest early on);
  - ``cache_g_<component>`` (one bool per component slot, e.g. ``attn1``, ``ff``): whether the
    group caches that component at all; components left out recompute every step.

- ``refresh`` (0 … ``max_interval``): every ``refresh`` steps *all* blocks recompute (0 = never).
  After a forced recomputation the group's interval counts again from there, so a longer
  ``interval_g`` never recomputes more steps (the FLOP-ideal speedup is monotone in it).

Step 0 always computes (nothing is cached yet). :meth:`CacheSpace.repair` makes sure a point
reuses something (``refresh = 1`` or no cached component anywhere would be the plain pipeline,
which is a baseline, not a search point). Variables: 2·G + G·components + 1 (9 for the embedded
model at G = 2 with ``attn1``/``ff``). Default searcher: NSGA-II (integer/bool genome, speed and
quality objectives).

Baselines: the identity (all ones), FORA at intervals 2, 3, 4 (as masks, points of the space),
DeepCache at intervals 2, 3, 5 (UNet families) and FirstBlockCache at thresholds 0.05, 0.1, 0.2
(transformer families: embedded, DiT, PixArt, SD3, Flux) as policies outside the space.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from difftune.accel.cache import CacheMaskConfig, FORAConfig
from difftune.accel.deepcache import DeepCacheConfig
from difftune.accel.first_block_cache import FirstBlockCacheConfig
from difftune.errors import SpaceError

from ._base import NamedPoint, Space, SpaceContext, Variable, register_space

__all__ = ["DEEPCACHE_INTERVALS", "FBC_THRESHOLDS", "FORA_INTERVALS", "CacheSpace", "recompute_rows"]

FORA_INTERVALS = (2, 3, 4)
#: DeepCache's reference settings span N = 2 … 10 on 50-step SD; 2, 3, 5 cover the fronts' knee at 20 steps.
DEEPCACHE_INTERVALS = (2, 3, 5)
FBC_THRESHOLDS = (0.05, 0.1, 0.2)
_UNET_FAMILIES = ("sd", "sdxl")
_SINGLE_KINDS = {"transformer"}
_DUAL_KINDS = {"double", "single", "joint"}


def recompute_rows(steps: int, interval: int, warmup: int, refresh: int) -> np.ndarray:
    """Which steps a group recomputes (True) under its interval, warm-up and the global refresh.

    Step 0, the first ``warmup`` steps and every ``refresh``-th step (if ``refresh`` ≥ 1) always
    compute; otherwise a step computes when the group's cached output is ``interval`` steps old.

        >>> recompute_rows(8, interval=3, warmup=0, refresh=0).astype(int).tolist()
        [1, 0, 0, 1, 0, 0, 1, 0]
    """
    rows = np.zeros(steps, dtype=bool)
    last = 0
    for i in range(steps):
        forced = i == 0 or i < warmup or (refresh >= 1 and i % refresh == 0)
        if forced or i - last >= interval:
            rows[i] = True
            last = i
    return rows


@register_space("cache")
class CacheSpace(Space):
    """Structured cache schedules: per block group interval, warm-up and cached components.

    Args:
        groups: number of contiguous block groups (default: about √depth, clipped to 2–4 and to the depth).
        max_interval: largest interval and refresh period (default: min(steps − 1, 10), at least 2);
            longer intervals only reuse features staler than any published schedule does.

    ``decode`` gives ``{"cache": CacheMaskConfig}`` of shape ``context.num_inference_steps ×
    blocks × components``; see the module docstring for the parametrisation.
    """

    default_searcher = "nsga2"
    sections = ("cache",)

    def __init__(self, groups: int | None = None, max_interval: int | None = None) -> None:
        for name, value in (("groups", groups), ("max_interval", max_interval)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SpaceError(f"{name}: expected an integer >= 1 or None, got {value!r}")
        self._groups = groups
        self._max_interval = max_interval

    # ---- structure -------------------------------------------------------------------------

    def groups(self, context: SpaceContext) -> list[tuple[int, int]]:
        """The block groups as ``[start, stop)`` index ranges, in execution order."""
        depth = len(context.info.blocks)
        if depth == 0:
            raise SpaceError(f"space 'cache': the {context.info.family} model reports no blocks")
        count = self._groups if self._groups is not None else min(4, max(2, round(math.sqrt(depth))))
        count = min(count, depth)
        # As np.array_split: sizes differ by at most one, the earlier groups take the remainder.
        sizes = [depth // count + (1 if g < depth % count else 0) for g in range(count)]
        bounds = [0, *itertools.accumulate(sizes)]
        return list(itertools.pairwise(bounds))

    def max_interval(self, context: SpaceContext) -> int:
        steps = context.num_inference_steps
        return self._max_interval if self._max_interval is not None else max(2, min(steps - 1, 10))

    def variables(self, context: SpaceContext) -> list[Variable]:
        steps = context.num_inference_steps
        if steps < 2:
            raise SpaceError(f"space 'cache': needs at least 2 steps to reuse anything, got {steps}")
        top = self.max_interval(context)
        out = []
        for g, (a, b) in enumerate(self.groups(context)):
            where = f"blocks {a}–{b - 1}"
            out += [
                Variable(
                    f"interval_{g}",
                    "int",
                    1,
                    top,
                    default=2,
                    help=f"{where}: recompute a cached component once its output is this many steps old",
                ),
                Variable(f"warmup_{g}", "int", 0, steps // 2, default=0, help=f"{where}: first steps always computed"),
            ]
            out += [
                Variable(f"cache_{g}_{c}", "bool", default=True, help=f"{where}: whether {c} is cached")
                for c in context.info.components
            ]
        out.append(Variable("refresh", "int", 0, top, default=0, help="every this many steps all blocks recompute"))
        return out

    # ---- repair / decode -------------------------------------------------------------------

    def _mask(self, params: Mapping[str, Any], context: SpaceContext) -> np.ndarray:
        info, steps = context.info, context.num_inference_steps
        mask = np.ones(info.mask_shape(steps), dtype=bool)
        refresh = int(params["refresh"])
        for g, (a, b) in enumerate(self.groups(context)):
            rows = recompute_rows(steps, int(params[f"interval_{g}"]), int(params[f"warmup_{g}"]), refresh)
            for k, component in enumerate(info.components):
                if params[f"cache_{g}_{component}"]:
                    mask[:, a:b, k] = rows[:, None]
        return mask

    def _repair(self, params: dict[str, Any], context: SpaceContext) -> list[str]:
        changes: list[str] = []
        if params["refresh"] == 1:
            params["refresh"] = 0
            changes.append("refresh: 1 recomputes everything every step (the plain pipeline); set to 0 (never)")
        if not self._mask(params, context).all():
            return changes
        # Nothing is reused: change the fewest knobs of one group so that it caches something.
        groups = range(len(self.groups(context)))
        components = context.info.components
        cached = [g for g in groups if any(params[f"cache_{g}_{c}"] for c in components)]
        g = cached[-1] if cached else len(groups) - 1
        if not cached:
            params[f"cache_{g}_{components[-1]}"] = True
            changes.append(f"cache_{g}_{components[-1]}: no component was cached anywhere; set to True")
        if params[f"interval_{g}"] < 2:
            params[f"interval_{g}"] = 2
            changes.append(f"interval_{g}: 1 reuses nothing; set to 2")
        if self._mask(params, context).all():
            if params[f"warmup_{g}"]:
                changes.append(f"warmup_{g}: {params[f'warmup_{g}']} leaves no step to reuse; set to 0")
                params[f"warmup_{g}"] = 0
            if params["refresh"]:
                changes.append(f"refresh: {params['refresh']} leaves no step to reuse; set to 0")
                params["refresh"] = 0
        return changes

    def _decode(self, params: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        return {"cache": CacheMaskConfig.from_array(context.info.components, self._mask(params, context))}

    def encode(self, sections: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """Parameters decoding to the ``cache`` mask in ``sections`` (a :class:`CacheMaskConfig` or FORA).

        Raises :class:`SpaceError` for settings outside the space: threshold policies, DeepCache,
        masks whose blocks differ within a group or whose pattern no interval/warm-up/refresh
        produces, and the identity (it reuses nothing).
        """
        extra = sorted(k for k, v in sections.items() if k != "cache" and v is not None)
        if extra:
            raise SpaceError(f"space 'cache' encodes only the cache section, got {extra}")
        config = sections.get("cache")
        info, steps = context.info, context.num_inference_steps
        if isinstance(config, FORAConfig):
            config = config.to_mask(info, steps)
        if not isinstance(config, CacheMaskConfig):
            raise SpaceError(f"space 'cache': {type(config).__name__} is not a mask schedule of this space")
        if tuple(config.components) != tuple(info.components):
            raise SpaceError(f"space 'cache': components {list(config.components)} are not {list(info.components)}")
        mask = config.array
        if mask.shape != info.mask_shape(steps):
            raise SpaceError(f"space 'cache': mask shape {mask.shape} is not {info.mask_shape(steps)}")
        if mask.all():
            raise SpaceError("space 'cache': the all-ones mask (no reuse) is the identity baseline, not a search point")
        top = self.max_interval(context)
        for refresh in (0, *range(2, top + 1)):
            params = self._encode_groups(mask, refresh, context)
            if params is not None and np.array_equal(self._mask(self.repair(params, context).params, context), mask):
                return params
        raise SpaceError("space 'cache': the mask is not a point of the space (no interval/warm-up/refresh fits it)")

    def _encode_groups(self, mask: np.ndarray, refresh: int, context: SpaceContext) -> dict[str, Any] | None:
        steps, top = context.num_inference_steps, self.max_interval(context)
        components = context.info.components
        params = self.default_params(context)
        params["refresh"] = refresh
        for g, (a, b) in enumerate(self.groups(context)):
            block = mask[:, a, :]
            if not all(np.array_equal(mask[:, j, :], block) for j in range(a, b)):
                return None
            patterns = {tuple(block[:, k]) for k in range(len(components)) if not block[:, k].all()}
            for k, c in enumerate(components):
                params[f"cache_{g}_{c}"] = not block[:, k].all()
            if not patterns:
                continue
            if len(patterns) > 1:
                return None
            rows = np.array(patterns.pop())
            fit = next(
                (
                    (interval, warmup)
                    for warmup in range(steps // 2 + 1)
                    for interval in range(2, top + 1)
                    if np.array_equal(recompute_rows(steps, interval, warmup, refresh), rows)
                ),
                None,
            )
            if fit is None:
                return None
            params[f"interval_{g}"], params[f"warmup_{g}"] = fit
        return params

    # ---- baselines -------------------------------------------------------------------------

    def baselines(self, context: SpaceContext) -> list[NamedPoint]:
        """Identity, FORA 2/3/4 (masks), DeepCache 2/3/5 (UNets) and FirstBlockCache 0.05/0.1/0.2 (transformers)."""
        info, steps = context.info, context.num_inference_steps
        identity = CacheMaskConfig.from_array(info.components, np.ones(info.mask_shape(steps), dtype=bool))
        out = [NamedPoint("identity", {"cache": identity}, None, "no caching: every component recomputes every step")]
        for k in FORA_INTERVALS:
            if k >= steps:
                continue
            mask = FORAConfig(interval=k).to_mask(info, steps)
            try:
                params: dict[str, Any] | None = self.encode({"cache": mask}, context)
            except SpaceError:
                params = None
            out.append(
                NamedPoint(f"fora_{k}", {"cache": mask}, params, f"FORA: all components recomputed every {k} steps")
            )
        if info.family in _UNET_FAMILIES and info.branches:
            for k in DEEPCACHE_INTERVALS:
                out.append(
                    NamedPoint(
                        f"deepcache_{k}",
                        {"cache": DeepCacheConfig(interval=k)},
                        None,
                        f"DeepCache: full UNet every {k} steps, shallowest skip branch fresh in between",
                    )
                )
        kinds = {b.kind for b in info.block_info}
        if len(info.blocks) >= 2 and kinds and (kinds <= _SINGLE_KINDS or kinds <= _DUAL_KINDS):
            for threshold in FBC_THRESHOLDS:
                out.append(
                    NamedPoint(
                        f"first_block_cache_{threshold:g}",
                        {"cache": FirstBlockCacheConfig(threshold=threshold)},
                        None,
                        f"FirstBlockCache: skip later blocks while the first block's residual moves < {threshold:g}",
                    )
                )
        return out
