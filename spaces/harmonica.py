"""The ``harmonica`` space: HarmoniCa's learned cache router, searched over its sparsity weight and threshold.

HarmoniCa (ModelTC/HarmoniCa) trains one logit per step × block × component with Step-Wise
Denoising Training and the Image-Error Proxy-Guided Objective (:mod:`difftune.search.harmonica`);
at inference a component recomputes where ``sigmoid(logit) > threshold``. The router ignores the
input, so a point decodes to a static :class:`~difftune.accel.CacheMaskConfig` (profile section
``cache``), the same form as the ``cache`` space's schedules.

Variables:

- ``l1`` (log scale): the sparsity weight of the training loss — the speed/quality knob. Its range
  spans "almost nothing cached" to "most cached" on the embedded model at 20 steps; it is snapped to
  :data:`L1_PER_DECADE` values per decade, so a study trains at most a handful of routers and every
  other point re-uses one.
- ``threshold`` (0.05 … 0.9, default 0.1 as in the reference's sampling): which learned weights
  count as "recompute". Thresholds are free: a router trained for an ``l1`` is memoised (and cached
  on disk), so trying several thresholds re-uses it.

Decoding a point trains (or loads) a router on the context's pipeline (``context.pipeline``), with
the study's first calibration samples (``context.spacing_samples``), call kwargs, guidance and step
count; a context built with ``keep_pipeline=False`` cannot decode. Default searcher: TPE (two
continuous knobs).

Baselines: ``harmonica_readme`` — the reference README's setting (DiT-XL/2: ``--l1 7e-8``,
``--ste-threshold 0.1``, inference ``--thres 0.1``, lr 0.01 over 2 000 trajectories) scaled to the
model: l1 times the README's 56 component slots per step over the model's own count (so the penalty
per fraction of the compute is the same; 3.3e-7 for the embedded model's 12), and the learning rate
of :func:`~difftune.search.harmonica.train_router`'s CPU budget; ``identity`` (no reuse) and
``fora_2`` (every component recomputed every other step), the schedules the paper compares against.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from difftune.accel.cache import CacheMaskConfig, FORAConfig
from difftune.errors import SpaceError

from ._base import NamedPoint, Space, SpaceContext, Variable, register_space

__all__ = ["L1_HIGH", "L1_LOW", "L1_PER_DECADE", "README_L1", "HarmoniCaSpace"]

#: The reference README's sparsity weight (DiT-XL/2 256², 28 blocks × {attn, mlp} = 56 slots per step).
README_L1 = 7e-8
_README_SLOTS = 56
#: The l1 range: at 20 steps on the embedded model, from almost nothing cached to most cached.
L1_LOW = 1e-9
L1_HIGH = 1e-3
#: l1 is snapped to this many log-spaced values per decade (a router is trained per value).
L1_PER_DECADE = 4
THRESHOLD_LOW, THRESHOLD_HIGH, THRESHOLD_DEFAULT = 0.05, 0.9, 0.1


def _snap(l1: float) -> float:
    """``l1`` on the grid of :data:`L1_PER_DECADE` values per decade (exact powers of ten stay exact)."""
    k = round(math.log10(l1) * L1_PER_DECADE)
    return float(10 ** (k / L1_PER_DECADE)) if k % L1_PER_DECADE else float(f"1e{k // L1_PER_DECADE}")


@register_space("harmonica")
class HarmoniCaSpace(Space):
    """HarmoniCa's router: a point is a sparsity weight ``l1`` and an inference ``threshold``.

    Args:
        iterations, lr, lambda_every, batch_size, seed: training settings passed to
            :func:`~difftune.search.harmonica.train_router` (defaults: its own).
        cache_dir: where trained routers are kept (default: ``<difftune cache>/harmonica``).

    ``decode`` gives ``{"cache": CacheMaskConfig}`` of shape ``context.num_inference_steps × blocks ×
    components``; see the module docstring.
    """

    default_searcher = "tpe"
    sections = ("cache",)

    def __init__(
        self,
        *,
        iterations: int | None = None,
        lr: float | None = None,
        lambda_every: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        cache_dir: str | Path | None = None,
    ) -> None:
        options: dict[str, Any] = {"seed": seed, "cache_dir": cache_dir}
        for name, value in (("iterations", iterations), ("lr", lr), ("lambda_every", lambda_every)):
            if value is not None:
                options[name] = value
        if batch_size is not None:
            options["batch_size"] = batch_size
        self._options = options
        self._routers: dict[tuple[Any, ...], Any] = {}

    # ---- variables / repair ----------------------------------------------------------------

    def variables(self, context: SpaceContext) -> list[Variable]:
        if context.num_inference_steps < 2:
            raise SpaceError(
                f"space 'harmonica': needs at least 2 steps to reuse anything, got {context.num_inference_steps}"
            )
        return [
            Variable(
                "l1",
                "float",
                L1_LOW,
                L1_HIGH,
                log=True,
                default=self.readme_l1(context),
                help="sparsity weight of the router's training loss: larger caches more (faster, lower quality)",
            ),
            Variable(
                "threshold",
                "float",
                THRESHOLD_LOW,
                THRESHOLD_HIGH,
                default=THRESHOLD_DEFAULT,
                help="a component recomputes where its learned weight sigmoid(logit) exceeds this",
            ),
        ]

    def _repair(self, params: dict[str, Any], context: SpaceContext) -> list[str]:
        snapped = min(max(_snap(params["l1"]), L1_LOW), L1_HIGH)
        if snapped == params["l1"]:
            return []
        before, params["l1"] = params["l1"], snapped
        return [f"l1: {before!r} snapped to {snapped!r} ({L1_PER_DECADE} trained values per decade)"]

    # ---- training / decode -----------------------------------------------------------------

    def router(self, l1: float, context: SpaceContext) -> Any:
        """The :class:`~difftune.search.harmonica.RouterResult` for ``l1`` (trained once, then memoised)."""
        from difftune.search.harmonica import train_router

        from ._spacing import study_samples_and_call

        samples, call = study_samples_and_call(context, "harmonica")
        pipe = context.pipeline
        key = (
            context.info.fingerprint,
            context.num_inference_steps,
            context.guidance_scale,
            json.dumps(call, sort_keys=True, default=repr),
            samples,
            float(l1),
        )
        if key not in self._routers:
            self._routers[key] = train_router(
                pipe,
                samples,
                num_inference_steps=context.num_inference_steps,
                l1=float(l1),
                guidance_scale=context.guidance_scale,
                call_kwargs=call,
                **self._options,
            )
        return self._routers[key]

    def _decode(self, params: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        router = self.router(params["l1"], context)
        return {"cache": router.mask(params["threshold"])}

    def encode(self, sections: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """Always :class:`SpaceError`: no closed form gives the ``l1`` whose training yields a given mask."""
        raise SpaceError(
            "space 'harmonica' cannot encode a cache schedule: its masks are learned, and no (l1, threshold) is "
            "known to reproduce a given one; search the 'cache' space to start from a mask"
        )

    # ---- baselines -------------------------------------------------------------------------

    def readme_l1(self, context: SpaceContext) -> float:
        """The README's l1 scaled to the model's component slots per step, on the space's grid."""
        slots = sum(bool(paths) for block in context.info.block_info for paths in block.components)
        scaled = README_L1 * _README_SLOTS / max(slots, 1)
        return min(max(_snap(scaled), L1_LOW), L1_HIGH)

    def baselines(self, context: SpaceContext) -> list[NamedPoint]:
        """``harmonica_readme`` (trained: the README's setting scaled to the model), ``identity``, ``fora_2``."""
        info, steps = context.info, context.num_inference_steps
        identity = CacheMaskConfig.from_array(info.components, np.ones(info.mask_shape(steps), dtype=bool))
        out = [NamedPoint("identity", {"cache": identity}, None, "no caching: every component recomputes every step")]
        if steps > 2:
            out.append(
                NamedPoint(
                    "fora_2",
                    {"cache": FORAConfig(interval=2).to_mask(info, steps)},
                    None,
                    "FORA: all components recomputed every 2 steps",
                )
            )
        if context.pipeline is not None:
            params = {"l1": self.readme_l1(context), "threshold": THRESHOLD_DEFAULT}
            out.append(
                NamedPoint(
                    "harmonica_readme",
                    self.decode(params, context),
                    params,
                    f"HarmoniCa README setting (DiT-XL/2: l1 {README_L1:g}, threshold 0.1) with l1 scaled to this "
                    f"model's component slots: {params['l1']:g}",
                )
            )
        return out
