"""The ``ecad`` space: the full binary cache genome — one bit per (step, block, component) — as ECAD searches it.

ECAD (AniAggarwal/ecad; TECHNIQUES.md §2) evolves the raw steps × blocks × components mask (1 =
recompute, 0 = reuse that component's cached output) with pymoo's NSGA-II: 4-point crossover (0.9),
bit-flip mutation of 5 % of the offspring, population 72, duplicates eliminated. This space is that
genome; its default searcher is ``pymoo-nsga2``, which uses exactly those operators on a space of
booleans, and whose generation 0 starts from this space's hand-made schedules (the baselines below,
observed before the first generation) instead of random bits only.

Variables: one bool per cell, named ``s{step}_b{block}_{component}``, for steps 1 … T−1 (step 0
always recomputes: nothing is cached yet) and only for the component slots a block has (Flux's
last double block has no ``ff_context``; UNet blocks without cross-attention no ``attentions``):
240 bits for the embedded model at 20 steps, 1,672 for PixArt-α's 28 blocks at 20 steps.

Baselines (named hand-made schedules, all points of the space):

- ``identity``: every bit 1 (the reference setting; ECAD's constraint "differs from all-recompute"
  is kept by the searcher's memo: the identity is measured once, as a baseline);
- ``fora_N``: everything recomputed every N steps (FORA);
- ``delta_dit_bB_N``: Δ-DiT — the rear blocks (from block B on) cached in the first half of the
  steps, the front blocks (before B) in the second half, refreshed every N steps;
- ``tgate_G``: T-GATE-like per-component — attention slots recomputed up to step G and reused
  after it, the other slots every step;
- ``even_<component>_N``: evenly spaced per-component caching — only that slot cached, refreshed
  every N steps.

Objectives: ``speedup`` (measured) or ``flops_ratio`` (ECAD's noise-free proxy: ``--objectives
flops_ratio,psnr,…``) and quality, as every study.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from difftune.accel.cache import CacheMaskConfig, FORAConfig
from difftune.errors import SpaceError

from ._base import NamedPoint, Space, SpaceContext, Variable, register_space

__all__ = [
    "EcadSpace",
    "bit_name",
    "delta_dit_mask",
    "even_mask",
    "from_ecad_json",
    "tgate_mask",
    "to_ecad_json",
]

_ATTENTION_SLOTS = ("attn", "attn1", "attn2", "attentions")


def bit_name(step: int, block: int, component: str) -> str:
    """The variable of cell (step, block, component)."""
    return f"s{step}_b{block}_{component}"


def _cells(context: SpaceContext) -> list[tuple[int, int, int]]:
    """(step, block, slot index) of every searched cell, step-major."""
    info, steps = context.info, context.num_inference_steps
    slots = len(info.components)
    present = [
        [bool(paths) for paths in block.components] if len(block.components) == slots else [True] * slots
        for block in info.block_info
    ] or [[True] * slots for _ in info.blocks]
    return [
        (step, b, c)
        for step in range(1, steps)
        for b in range(len(info.blocks))
        for c in range(len(info.components))
        if present[b][c]
    ]


def delta_dit_mask(shape: tuple[int, int, int], boundary: int, interval: int) -> np.ndarray:
    """Δ-DiT: blocks ``boundary…`` cached in the first half of the steps, blocks ``…boundary`` in the
    second, each refreshed every ``interval`` steps; step 0 and every refresh step recompute all."""
    steps, blocks, _ = shape
    mask = np.ones(shape, dtype=bool)
    for step in range(1, steps):
        if step % interval == 0:
            continue
        cached = range(boundary, blocks) if step < steps // 2 else range(boundary)
        for block in cached:
            mask[step, block, :] = False
    return mask


def tgate_mask(shape: tuple[int, int, int], components: tuple[str, ...], gate: int) -> np.ndarray:
    """T-GATE-like: attention slots recomputed up to step ``gate`` and reused after it; others always."""
    mask = np.ones(shape, dtype=bool)
    for c, name in enumerate(components):
        if name in _ATTENTION_SLOTS:
            mask[gate + 1 :, :, c] = False
    return mask


def even_mask(shape: tuple[int, int, int], slot: int, interval: int) -> np.ndarray:
    """Evenly spaced per-component caching: slot ``slot`` reused except every ``interval`` steps."""
    mask = np.ones(shape, dtype=bool)
    for step in range(1, shape[0]):
        if step % interval:
            mask[step, :, slot] = False
    return mask


@register_space("ecad")
class EcadSpace(Space):
    """ECAD's genome: one bool per (step ≥ 1, block, present component) cell (see the module docstring)."""

    default_searcher = "pymoo-nsga2"
    #: four generations of 25 (see PymooSearcher.default_population), screened on 4 samples: half of the
    #: candidates stop there, and the study takes about 3½ minutes on 2 CPU cores
    default_budget = 100
    default_screen = 4
    sections = ("cache",)

    def variables(self, context: SpaceContext) -> list[Variable]:
        info = context.info
        if context.num_inference_steps < 2:
            raise SpaceError("space 'ecad': needs at least 2 steps (step 0 always recomputes)")
        return [
            Variable(
                bit_name(step, b, info.components[c]),
                "bool",
                default=True,
                help=f"recompute {info.components[c]} of {info.blocks[b]} at step {step} (False: reuse its cache)",
            )
            for step, b, c in _cells(context)
        ]

    def _mask(self, params: Mapping[str, Any], context: SpaceContext) -> np.ndarray:
        info = context.info
        mask = np.ones(info.mask_shape(context.num_inference_steps), dtype=bool)
        for step, b, c in _cells(context):
            mask[step, b, c] = bool(params[bit_name(step, b, info.components[c])])
        return mask

    def _decode(self, params: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        return {"cache": CacheMaskConfig.from_array(context.info.components, self._mask(params, context))}

    def encode(self, sections: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """The bits of a cache mask of this model and step count (a policy or another shape is outside the space)."""
        cache = sections.get("cache")
        info, steps = context.info, context.num_inference_steps
        if isinstance(cache, FORAConfig):
            cache = cache.to_mask(info, steps)
        if not isinstance(cache, CacheMaskConfig):
            raise SpaceError(f"space 'ecad' encodes cache masks only, not {type(cache).__name__}")
        mask = cache.array
        if mask.shape != info.mask_shape(steps) or tuple(cache.components) != tuple(info.components):
            raise SpaceError(
                f"space 'ecad': a {mask.shape} mask over {list(cache.components)} is not this model's "
                f"{info.mask_shape(steps)} over {list(info.components)}"
            )
        return {bit_name(step, b, info.components[c]): bool(mask[step, b, c]) for step, b, c in _cells(context)}

    def _point(self, name: str, mask: np.ndarray, context: SpaceContext, description: str) -> NamedPoint:
        config = CacheMaskConfig.from_array(context.info.components, mask)
        params = self.encode({"cache": config}, context)
        return NamedPoint(name, self._decode(params, context), params, description)

    def baselines(self, context: SpaceContext) -> list[NamedPoint]:
        """Identity, FORA, Δ-DiT, T-GATE-like and evenly spaced per-component schedules, as masks of the genome."""
        info, steps = context.info, context.num_inference_steps
        shape = info.mask_shape(steps)
        out = [self._point("identity", np.ones(shape, dtype=bool), context, "no caching: every cell recomputes")]
        for n in (2, 3, 4):
            if n < steps:
                mask = FORAConfig(interval=n).to_mask(info, steps).array
                out.append(self._point(f"fora_{n}", mask, context, f"FORA: everything recomputed every {n} steps"))
        blocks = len(info.blocks)
        if blocks >= 2:
            boundary = blocks // 2
            for n in (2, 3):
                if n < steps:
                    out.append(
                        self._point(
                            f"delta_dit_b{boundary}_{n}",
                            delta_dit_mask(shape, boundary, n),
                            context,
                            f"Δ-DiT: blocks {boundary}… cached early, …{boundary - 1} late, refreshed every {n} steps",
                        )
                    )
        if any(name in _ATTENTION_SLOTS for name in info.components):
            for fraction in (0.25, 0.5):
                gate = max(1, round(steps * fraction))
                if gate < steps - 1:
                    out.append(
                        self._point(
                            f"tgate_{gate}",
                            tgate_mask(shape, tuple(info.components), gate),
                            context,
                            f"T-GATE-like: attention recomputed up to step {gate}, reused after",
                        )
                    )
        for slot, component in enumerate(info.components):
            if steps > 2:
                out.append(
                    self._point(
                        f"even_{component}_2",
                        even_mask(shape, slot, 2),
                        context,
                        f"only {component} cached, recomputed every 2 steps",
                    )
                )
        return out

    def seeds(self, context: SpaceContext) -> list[NamedPoint]:
        """BAC's schedules (:class:`~difftune.spaces.BACSpace`'s named points: K ≈ T/4, T/2, 3T/4 and its
        reference setting), from the pipeline's own recorded trajectories: starting points of
        generation 0 beside the hand-made baselines, evaluated after them as kind ``seed``.

        They need the pipeline (a context built with ``keep_pipeline=False`` gets none) and cost one
        recording of the plain pipeline's trajectories (cached on disk; 0.5 s on the embedded model).
        """
        if context.pipeline is None:
            return []
        from .bac import BACSpace

        out = []
        for point in BACSpace().baselines(context):
            cache = point.sections.get("cache")
            if isinstance(cache, CacheMaskConfig):
                out.append(self._point(f"seed_{point.name}", cache.array, context, f"{point.description} (BAC)"))
        return out


# --------------------------------------------------------------------------------------------
# ECAD's schedule files
# --------------------------------------------------------------------------------------------


def to_ecad_json(cache: CacheMaskConfig, name: str, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A cache mask in ECAD's published schedule format (AniAggarwal/ecad ``schedules/…/*.json``).

    ``{"cache_schedule": {"num_blocks", "num_inference_steps", "name", "attributes", "schedule":
    {"000": {"0": {"attn1": true, …}, …}, …}}, "metrics": {…}}`` — ``true`` recomputes the component,
    ``false`` reuses its cache, as difftune's 1 / 0. ``metrics`` are difftune's figures (under
    ``"difftune"``), beside ECAD's own keys where known.
    """
    mask = cache.array
    schedule = {
        f"{step:03d}": {
            str(block): {component: bool(mask[step, block, c]) for c, component in enumerate(cache.components)}
            for block in range(mask.shape[1])
        }
        for step in range(mask.shape[0])
    }
    return {
        "cache_schedule": {
            "num_blocks": int(mask.shape[1]),
            "num_inference_steps": int(mask.shape[0]),
            "name": name,
            "attributes": {"exported_by": "difftune", "reused_share": round(float(1.0 - mask.mean()), 6)},
            "schedule": schedule,
        },
        "metrics": {"difftune": dict(metrics or {})},
    }


def from_ecad_json(data: Any, components: tuple[str, ...] | list[str] | None = None) -> CacheMaskConfig:
    """The cache mask of an ECAD schedule file's contents (``json.load`` of it).

    ``components`` (the model's slots, :attr:`difftune.ModelInfo.components`) order the mask's last
    axis and must be exactly the file's; without them the file's own order is kept.

    Raises:
        SpaceError: the contents are not an ECAD schedule (the message names what is wrong).
    """
    body = data.get("cache_schedule") if isinstance(data, Mapping) else None
    if not isinstance(body, Mapping) or not isinstance(body.get("schedule"), Mapping):
        raise SpaceError("not an ECAD schedule: expected {'cache_schedule': {'schedule': {step: {block: {...}}}}}")
    schedule = body["schedule"]
    try:
        steps = sorted(schedule, key=int)
        first = schedule[steps[0]]
        blocks = sorted(first, key=int)
        found = list(first[blocks[0]])
    except (ValueError, IndexError, TypeError, KeyError) as exc:
        raise SpaceError(f"ECAD schedule: steps and blocks must be numbered keys with component maps ({exc})") from exc
    order = list(components) if components is not None else found
    if sorted(order) != sorted(found):
        raise SpaceError(f"ECAD schedule: its components {found} are not this model's {list(order)}")
    if [int(s) for s in steps] != list(range(len(steps))) or [int(b) for b in blocks] != list(range(len(blocks))):
        raise SpaceError("ECAD schedule: steps and blocks must be numbered 0, 1, … without gaps")
    for key, expected in (("num_inference_steps", len(steps)), ("num_blocks", len(blocks))):
        if key in body and int(body[key]) != expected:
            raise SpaceError(f"ECAD schedule: {key} says {body[key]} but the schedule has {expected}")
    mask = np.ones((len(steps), len(blocks), len(order)), dtype=bool)
    for s, step in enumerate(steps):
        for b, block in enumerate(blocks):
            cell = schedule[step].get(block) if isinstance(schedule[step], Mapping) else None
            if not isinstance(cell, Mapping) or set(cell) != set(order):
                raise SpaceError(f"ECAD schedule: step {step} block {block} does not list exactly {order}")
            for c, component in enumerate(order):
                if not isinstance(cell[component], bool):
                    raise SpaceError(f"ECAD schedule: step {step} block {block} {component} is not true/false")
                mask[s, b, c] = cell[component]
    return CacheMaskConfig.from_array(order, mask)
