"""The ``bac`` space: BAC (block-wise adaptive caching) schedules, decoded to a steps × blocks × components mask.

BAC (TECHNIQUES.md §4; reference code ky-ji/HAS, ``BACInfer/``) gives every cached unit — one
component slot of one block, e.g. ``transformer_blocks.3`` / ``ff`` — its own update steps:

1. **Record** every unit's output over full trajectories of the plain pipeline on the study's first
   calibration samples and build a T×T similarity matrix ``S`` per unit
   (:func:`difftune.evaluators.component_similarity`; cosine, or minus the L1 / MSE distance, so
   higher is always more similar).
2. **Adaptive Caching Scheduler** (:func:`adaptive_caching_schedule`): split the T steps into K
   segments, each recomputed at its first step and reused until the next, maximising the total
   similarity of the reused outputs to the output they stand in for:
   ``cost[a, b] = Σ_{t=a..b} S[a, t]``, ``dp[1, i] = cost[0, i]``,
   ``dp[k, i] = max_j dp[k−1, j] + cost[j+1, i]``; the K segment starts are the update steps
   (step 0 always updates). O(K·T²) per unit.
3. **Bubbling Union** (:func:`bubbling_union`): rank the units by the mean L1 distance between
   their outputs at any two steps, take the top N; each taken unit also updates at every step where
   an FFN unit of its own or a deeper block updates, so a stale input never meets a fresh FFN
   downstream. Applies only when N ≥ 2, as in the reference.

The searched knobs are ``k`` (update steps per unit, 1 … T; T is the plain pipeline), ``n`` (Bubbling-Union
units, 0 … the number of units; 0 and 1 leave the schedules as the DP made them) and ``metric``
(``cosine``, ``l1``, ``mse``). Step 0 always computes. Default searcher: TPE (three variables).

The recording runs once per (model, call, samples) — cached on disk by the evaluators and in this
process by the space — so every decode after the first is a few small DPs. It needs
``context.pipeline`` (``SpaceContext.from_pipeline(pipe)``, the default ``keep_pipeline=True``) and
records on ``context.spacing_samples`` (a study passes its first calibration samples) with the
context's call (``call_kwargs``, ``guidance_scale``, ``num_inference_steps``).

Baselines: ``bac_k<K>`` for K ≈ T/4, T/2, 3T/4 with cosine and no Bubbling Union, and
``bac_reference``: the reference code's defaults — ``num_caches`` 30 of its 100 steps scaled to T,
N = 5, cosine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from difftune.accel.cache import CacheMaskConfig
from difftune.errors import EvaluationError, SpaceError

from ._base import NamedPoint, Space, SpaceContext, Variable, register_space

__all__ = [
    "FFN_MODULES",
    "REFERENCE_BU_BLOCKS",
    "BACSpace",
    "adaptive_caching_schedule",
    "bac_mask",
    "bubbling_union",
    "clear_bac_cache",
    "default_k",
    "mean_pairwise_l1",
    "schedule_value",
    "segment_costs",
]

#: The reference's ``num_caches`` default (30) on its 100 sampling steps: K is scaled to T by this share.
REFERENCE_NUM_CACHES, REFERENCE_STEPS = 30, 100
#: The reference's default number of Bubbling-Union blocks (``num_bu_blocks`` in its scripts).
REFERENCE_BU_BLOCKS = 5
#: Module names (the last part of a component's path) that are feed-forward networks for Bubbling
#: Union: the transformers' ``ff`` (and SD3/Flux's ``ff_context``) and Flux single blocks' ``proj_mlp``.
FFN_MODULES = ("ff", "ff_context", "proj_mlp")
_BASELINE_SHARES = (0.25, 0.5, 0.75)

U = TypeVar("U", bound=Hashable)


# --------------------------------------------------------------------------------------------
# The Adaptive Caching Scheduler
# --------------------------------------------------------------------------------------------


def _check_similarity(similarity: Any) -> np.ndarray:
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise SpaceError(f"similarity: expected a T×T matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise SpaceError("similarity: holds NaN or inf")
    return s


def segment_costs(similarity: np.ndarray) -> np.ndarray:
    """``cost[a, b] = Σ_{t=a..b} S[a, t]`` for ``a ≤ b``: the similarity gained by computing at step ``a``
    and reusing that output through step ``b`` (entries below the diagonal are unused)."""
    s = _check_similarity(similarity)
    return np.cumsum(np.triu(s), axis=1)


def schedule_value(similarity: np.ndarray, update_steps: Sequence[int]) -> float:
    """The DP's objective for ``update_steps``: Σ over segments of ``cost[start, end]`` (segments run
    from each update step to the step before the next, the last through T − 1)."""
    cost = segment_costs(similarity)
    starts = sorted(int(s) for s in update_steps)
    steps = cost.shape[0]
    if not starts or starts[0] != 0 or len(set(starts)) != len(starts) or starts[-1] >= steps:
        raise SpaceError(f"update_steps: expected distinct steps in 0 … {steps - 1} starting at 0, got {starts}")
    ends = [*(s - 1 for s in starts[1:]), steps - 1]
    return float(sum(cost[a, b] for a, b in zip(starts, ends, strict=True)))


def adaptive_caching_schedule(similarity: np.ndarray, k: int) -> list[int]:
    """BAC's Adaptive Caching Scheduler: the ``k`` update steps maximising the reused outputs' similarity.

    A DP over segment ends (as ``OptimalCacheScheduler.compute_optimal_steps`` in ky-ji/HAS
    ``BACInfer/analysis/optimal_cache_scheduler.py``): ``dp[1, i] = cost[0, i]``,
    ``dp[k, i] = max_{k−2 ≤ j < i} dp[k−1, j] + cost[j+1, i]``, then backtracking from
    ``dp[k, T−1]``; among equal values the smallest ``j`` wins, as the reference's strict ``>`` keeps.
    Higher ``similarity`` is better (pass minus a distance to minimise it). O(k·T²).

        >>> s = np.array([[1, .9, .1, .1], [.9, 1, .1, .1], [.1, .1, 1, .9], [.1, .1, .9, 1]])
        >>> adaptive_caching_schedule(s, 2)
        [0, 2]

    Raises:
        SpaceError: ``similarity`` is not a finite T×T matrix, or ``k`` is not in 1 … T.
    """
    cost = segment_costs(similarity)
    steps = cost.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= steps:
        raise SpaceError(f"k: expected an integer in 1 … {steps} (the number of steps), got {k!r}")
    k = int(k)
    dp = np.full((k + 1, steps), -np.inf)
    dp[1] = cost[0]
    path = np.zeros((k + 1, steps), dtype=int)
    # candidate[j, i] = dp[k−1, j] + cost[j+1, i], for j = 0 … T−2; only k−2 ≤ j < i are allowed.
    j_idx = np.arange(steps - 1)[:, None]
    i_idx = np.arange(steps)[None, :]
    later = cost[1:]
    for kk in range(2, k + 1):
        candidate = dp[kk - 1, :-1, None] + later
        candidate = np.where((j_idx >= kk - 2) & (j_idx < i_idx), candidate, -np.inf)
        best = np.argmax(candidate, axis=0)  # the first maximum: the smallest j among ties
        dp[kk, kk - 1 :] = candidate[best, i_idx[0]][kk - 1 :]
        path[kk] = best
    out = []
    i = steps - 1
    for kk in range(k, 1, -1):
        j = int(path[kk, i])
        out.append(j + 1)
        i = j
    out.append(0)
    return sorted(out)


# --------------------------------------------------------------------------------------------
# Bubbling Union
# --------------------------------------------------------------------------------------------


def mean_pairwise_l1(l1_similarity: np.ndarray) -> np.ndarray:
    """The Bubbling-Union ranking score of each unit: the mean L1 distance between its outputs at two
    different steps, over all pairs ``i < j`` (``compute_block_l1_errors`` in ky-ji/HAS
    ``BACInfer/analysis/bu_block_selection.py``), from ``l1`` similarities (minus the distance) of shape
    ``… × T × T``."""
    s = np.asarray(l1_similarity, dtype=np.float64)
    steps = s.shape[-1]
    if steps < 2:
        return np.zeros(s.shape[:-2])
    upper = np.triu(np.ones((steps, steps), dtype=bool), k=1)
    return -s[..., upper].mean(axis=-1)


def bubbling_union(
    update_steps: Mapping[U, Sequence[int]],
    layer_of: Mapping[U, int],
    is_ffn: Mapping[U, bool],
    errors: Mapping[U, float],
    n: int,
) -> dict[U, list[int]]:
    """BAC's Bubbling Union: the top-``n`` units by ``errors`` also update wherever an FFN unit of the same
    or a deeper layer updates.

    Follows ky-ji/HAS ``BACInfer/core/diffusion_cache_wrapper.py``,
    ``FastDiffusionPolicy._load_block_optimal_steps`` (the "Unified BU propagation" block, with the
    selection of ``BACInfer/analysis/bu_block_selection.py`` ``select_top_error_blocks``):

    - the units are ranked by ``errors`` (mean pairwise L1 between steps), highest first, ties in the
      mapping's order (Python's stable sort, as the reference's ``sorted(…, reverse=True)``); the first
      ``n`` are taken;
    - only if at least two are taken (``if len(bu_blocks) > 1``) does anything change;
    - each taken unit's steps become the union of its own and those of *every* FFN unit — taken or
      not, itself included — whose layer index is ``>=`` its own ("Phase 1"; the reference's
      "Phase 2" is commented out there, and so left out here).

    The reference updates its step lists in place while it walks the taken units by (layer, sa < mha
    < ff); an FFN it has already widened is never read again (later units read only deeper layers, and
    the FFN is the last sub-block of its layer), so unioning the *original* FFN steps, as here, is the
    same result whatever order a model's component slots come in. Units outside ``errors`` are never
    taken; every unit of ``update_steps`` is in the result, sorted.

        >>> steps = {"0.attn": [0], "0.ff": [0, 3], "1.attn": [0, 1], "1.ff": [0, 2]}
        >>> layer = {"0.attn": 0, "0.ff": 0, "1.attn": 1, "1.ff": 1}
        >>> ffn = {"0.attn": False, "0.ff": True, "1.attn": False, "1.ff": True}
        >>> bubbling_union(steps, layer, ffn, {"0.attn": 3.0, "0.ff": 1.0, "1.attn": 2.0, "1.ff": 0.5}, 2)
        {'0.attn': [0, 2, 3], '0.ff': [0, 3], '1.attn': [0, 1, 2], '1.ff': [0, 2]}
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise SpaceError(f"n: expected an integer >= 0, got {n!r}")
    out = {unit: sorted(int(s) for s in steps) for unit, steps in update_steps.items()}
    ranked = sorted((u for u in errors if u in update_steps), key=lambda u: errors[u], reverse=True)
    taken = ranked[: int(n)]
    if len(taken) < 2:
        return out
    ffns = [u for u in update_steps if is_ffn.get(u, False)]
    for unit in taken:
        deeper = {int(s) for f in ffns if layer_of[f] >= layer_of[unit] for s in update_steps[f]}
        out[unit] = sorted(set(out[unit]) | deeper)
    return out


# --------------------------------------------------------------------------------------------
# The mask
# --------------------------------------------------------------------------------------------


def bac_mask(
    similarities: np.ndarray,
    k: int,
    n: int = 0,
    *,
    errors: np.ndarray | None = None,
    ffn: np.ndarray | None = None,
    present: np.ndarray | None = None,
) -> np.ndarray:
    """The BAC cache mask ``T × blocks × components`` (True = recompute) from per-unit similarities.

    Args:
        similarities: ``blocks × components × T × T``, higher = more similar
            (:func:`difftune.evaluators.component_similarity`).
        k: update steps per unit (1 … T; T recomputes everything).
        n: Bubbling-Union units (0 and 1: none).
        errors: ``blocks × components`` ranking scores for Bubbling Union (:func:`mean_pairwise_l1` of
            the ``l1`` similarities); needed when ``n >= 2``.
        ffn: ``blocks × components``, which units are feed-forward networks (default: none).
        present: ``blocks × components``, which units exist (default: all); the others stay 1.
    """
    s = np.asarray(similarities, dtype=np.float64)
    if s.ndim != 4 or s.shape[2] != s.shape[3]:
        raise SpaceError(f"similarities: expected blocks × components × T × T, got shape {s.shape}")
    blocks, slots, steps, _ = s.shape
    grid = (blocks, slots)
    present_ = np.ones(grid, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    ffn_ = np.zeros(grid, dtype=bool) if ffn is None else np.asarray(ffn, dtype=bool)
    if present_.shape != grid or ffn_.shape != grid:
        raise SpaceError(f"present and ffn: expected shape {grid}, got {present_.shape} and {ffn_.shape}")
    units = [(b, c) for b in range(blocks) for c in range(slots) if present_[b, c]]
    schedules = {u: adaptive_caching_schedule(s[u], k) for u in units}
    return _mask_from(schedules, (steps, blocks, slots), n, errors, ffn_)


def _mask_from(
    schedules: Mapping[tuple[int, int], Sequence[int]],
    shape: tuple[int, int, int],
    n: int,
    errors: np.ndarray | None,
    ffn: np.ndarray,
) -> np.ndarray:
    if n >= 2:
        if errors is None:
            raise SpaceError("errors: Bubbling Union (n >= 2) ranks the units by their errors; pass them")
        scores = np.asarray(errors, dtype=np.float64)
        if scores.shape != shape[1:]:
            raise SpaceError(f"errors: expected shape {shape[1:]}, got {scores.shape}")
        schedules = bubbling_union(
            schedules,
            {u: u[0] for u in schedules},
            {u: bool(ffn[u]) for u in schedules},
            {u: float(scores[u]) for u in schedules},
            n,
        )
    mask = np.ones(shape, dtype=bool)
    for (b, c), steps in schedules.items():
        mask[:, b, c] = False
        mask[list(steps), b, c] = True
    return mask


def default_k(steps: int) -> int:
    """The reference's ``num_caches`` default (30 of 100 steps) scaled to ``steps``: 6 of 20."""
    return max(1, min(steps, round(steps * REFERENCE_NUM_CACHES / REFERENCE_STEPS)))


def _units(info: Any) -> tuple[np.ndarray, np.ndarray]:
    """(present, ffn): which (block, slot) units have modules, and which of those are FFNs."""
    grid = (len(info.blocks), len(info.components))
    present = np.zeros(grid, dtype=bool)
    ffn = np.zeros(grid, dtype=bool)
    for b, block in enumerate(info.block_info):
        for c, paths in enumerate(block.components):
            present[b, c] = bool(paths)
            ffn[b, c] = bool(paths) and all(p.rsplit(".", 1)[-1] in FFN_MODULES for p in paths)
    return present, ffn


# --------------------------------------------------------------------------------------------
# Recorded similarities, memoised per process
# --------------------------------------------------------------------------------------------

_SIMILARITIES: dict[tuple[Any, ...], np.ndarray] = {}
_SCHEDULES: dict[tuple[Any, ...], dict[tuple[int, int], list[int]]] = {}


def clear_bac_cache() -> None:
    """Forget the similarities and schedules memoised in this process (the on-disk cache stays)."""
    _SIMILARITIES.clear()
    _SCHEDULES.clear()


def _call(context: SpaceContext) -> dict[str, Any]:
    call = dict(context.call_kwargs)
    if context.guidance_scale is not None:
        call["guidance_scale"] = context.guidance_scale
    return call


def _recording(context: SpaceContext) -> tuple[Any, list[Any], dict[str, Any], tuple[Any, ...]]:
    """(pipeline, samples, call kwargs, memo key) of the context's recording."""
    from ._spacing import _as_samples, _samples

    pipe = context.pipeline
    if pipe is None:
        raise SpaceError(
            "space 'bac' records feature trajectories on the pipeline: build the context with "
            "SpaceContext.from_pipeline(pipe) (keep_pipeline=True)"
        )
    samples = _as_samples(_samples(pipe, context.spacing_samples, context.info.conditioning))
    call = _call(context)
    # The scheduler shapes the trajectory as much as the call does (the disk cache keys on both too).
    blob = json.dumps({"call": call, "scheduler": dict(context.scheduler_config)}, sort_keys=True, default=repr)
    call_key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    key = (context.info.fingerprint, context.num_inference_steps, call_key, tuple(s.key for s in samples))
    return pipe, samples, call, key


def _similarity(context: SpaceContext, metric: str) -> np.ndarray:
    pipe, samples, call, key = _recording(context)
    if (*key, metric) not in _SIMILARITIES:
        from difftune.evaluators.trajectory import component_similarity

        try:
            value = component_similarity(pipe, samples, call, context.num_inference_steps, metric)
        except EvaluationError as exc:
            raise SpaceError(f"space 'bac': recording the feature trajectories failed: {exc}") from exc
        _SIMILARITIES[(*key, metric)] = value
    return _SIMILARITIES[(*key, metric)]


def _metrics() -> tuple[str, ...]:
    from difftune.evaluators.trajectory import SIMILARITY_METRICS

    return SIMILARITY_METRICS


# --------------------------------------------------------------------------------------------
# The space
# --------------------------------------------------------------------------------------------


@register_space("bac")
class BACSpace(Space):
    """BAC cache schedules: per-unit update steps from the Adaptive Caching Scheduler, plus Bubbling Union.

    ``decode`` gives ``{"cache": CacheMaskConfig}`` of shape ``context.num_inference_steps × blocks ×
    components``; see the module docstring. Variables: ``k``, ``n``, ``metric``.
    """

    default_searcher = "tpe"
    sections = ("cache",)

    def variables(self, context: SpaceContext) -> list[Variable]:
        steps = context.num_inference_steps
        present, _ = _units(context.info)
        units = int(present.sum())
        if units == 0:
            raise SpaceError(f"space 'bac': the {context.info.family} model reports no cache components")
        return [
            Variable(
                "k",
                "int",
                1,
                steps,
                default=default_k(steps),
                help="update steps per component (the Adaptive Caching Scheduler's K); the rest reuse",
            ),
            Variable(
                "n",
                "int",
                0,
                units,
                default=min(REFERENCE_BU_BLOCKS, units),
                help="Bubbling Union: the n components whose outputs change most also update with deeper FFNs "
                "(0 and 1: off)",
            ),
            Variable(
                "metric",
                "categorical",
                choices=_metrics(),
                help="how two steps' outputs are compared: cosine similarity, or L1 / MSE distance",
            ),
        ]

    def mask(self, params: Mapping[str, Any], context: SpaceContext) -> np.ndarray:
        """The mask (``T × blocks × components``, True = recompute) of valid ``params``."""
        info = context.info
        k, n, metric = int(params["k"]), int(params["n"]), str(params["metric"])
        present, ffn = _units(info)
        key = (*_recording(context)[3], metric, k)
        if key not in _SCHEDULES:
            s = _similarity(context, metric)
            _SCHEDULES[key] = {
                (int(b), int(c)): adaptive_caching_schedule(s[b, c], k)
                for b, c in zip(*np.nonzero(present), strict=True)
            }
        errors = mean_pairwise_l1(_similarity(context, "l1")) if n >= 2 else None
        return _mask_from(_SCHEDULES[key], info.mask_shape(context.num_inference_steps), n, errors, ffn)

    def _decode(self, params: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        return {"cache": CacheMaskConfig.from_array(context.info.components, self.mask(params, context))}

    def encode(self, sections: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """The first (metric, smallest k, smallest n) whose schedule is the ``cache`` mask in ``sections``.

        Raises :class:`SpaceError` for anything but a :class:`CacheMaskConfig` of this model and step
        count, and for masks no BAC point produces.
        """
        extra = sorted(k for k, v in sections.items() if k != "cache" and v is not None)
        if extra:
            raise SpaceError(f"space 'bac' encodes only the cache section, got {extra}")
        config = sections.get("cache")
        info, steps = context.info, context.num_inference_steps
        if not isinstance(config, CacheMaskConfig):
            raise SpaceError(f"space 'bac': {type(config).__name__} is not a mask schedule of this space")
        if tuple(config.components) != tuple(info.components) or config.array.shape != info.mask_shape(steps):
            raise SpaceError(
                f"space 'bac': a mask of shape {config.array.shape} over {list(config.components)} is not "
                f"{info.mask_shape(steps)} over {list(info.components)}"
            )
        target = config.array
        units = int(_units(info)[0].sum())
        for metric in _metrics():
            for k in range(1, steps + 1):
                for n in range(units + 1):
                    params = {"k": k, "n": n, "metric": metric}
                    if np.array_equal(self.mask(params, context), target):
                        return params
        raise SpaceError("space 'bac': the mask is not a BAC schedule of this model (no k, n, metric gives it)")

    def baselines(self, context: SpaceContext) -> list[NamedPoint]:
        """``bac_k<K>`` (K ≈ T/4, T/2, 3T/4; cosine; no Bubbling Union) and ``bac_reference``."""
        steps = context.num_inference_steps
        units = int(_units(context.info)[0].sum())
        ks = sorted({round(steps * share) for share in _BASELINE_SHARES} - {0, steps})
        points = [
            (
                f"bac_k{k}",
                {"k": k, "n": 0, "metric": "cosine"},
                f"BAC: {k} of {steps} steps update each component (cosine DP), no Bubbling Union",
            )
            for k in ks
        ]
        reference = {"k": default_k(steps), "n": min(REFERENCE_BU_BLOCKS, units), "metric": "cosine"}
        points.append(
            (
                "bac_reference",
                reference,
                f"BAC at its reference code's defaults: num_caches {REFERENCE_NUM_CACHES} of {REFERENCE_STEPS} "
                f"steps scaled to k={reference['k']} of {steps}, n={reference['n']} Bubbling-Union components, "
                "cosine",
            )
        )
        return [NamedPoint(name, self.decode(params, context), params, text) for name, params, text in points]
