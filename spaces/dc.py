"""The ``dc`` space: DC-Solver's per-step compensation ratios, fitted through the denoiser for each schedule.

A point names a base schedule and how its ratios are fitted; decoding fits them
(:func:`difftune.search.dc.fit_dc_ratios`: greedy, ρ_0 = ρ_1 = 1, AdamW through the denoiser against a
200-step DDIM trajectory, on the study's first calibration samples ``context.spacing_samples`` with
its guidance and call) and gives ``{"solver": SolverSchedule}`` with one ``dc_ratio`` per step.
Fits are memoised and cached on disk, so a point is fitted once per model, call and setting.

Variables:

- ``nfe`` — model evaluations, within the context's ``nfe_range``.
- ``base`` — ``"unipc"`` (UniPC bh2 order 2, no corrector at step 0: the reference's) or
  ``"dpmsolver++"`` (DPM-Solver++(2M): no corrector, so each step's loss is its predictor's alone);
  both on the pipeline scheduler's own timestep spacing.
- ``final_sigma`` (VP models) — ``"sigma_min"`` (the reference's SD setting: sampling ends at
  σ(ᾱ₀)) or ``"scheduler"`` (the pipeline scheduler's own ``final_sigmas_type``). The profile
  records the choice (``solver.final_sigma``), so the ratios are always used with the end they
  were fitted for.
- ``target`` — ``"reference"`` (the last two steps' losses use DDIM's final latent, as the
  reference) or ``"next"`` (only the last step's).
- ``bound`` — ``"none"`` (free ratios, the reference's default) or ``"tanh"`` (1 ± 0.5).

Default searcher: TPE. Baselines: at every NFE in range, the plain base schedule (ρ = 1: UniPC as the
reference runs it) and DC-Solver as its reference runs (UniPC, σ_min, reference targets, free
ratios; fitted, so it needs ``context.pipeline``); and, when the model has a stored CPR
(``difftune cpr``, :func:`~difftune.search.dc.fit_model_cpr`), UniPC with the ratios it predicts at
the study's guidance — no fitting at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from difftune.accel.solver import SolverSchedule, USFScheduler
from difftune.errors import SpaceError

from ._base import NamedPoint, Space, SpaceContext, Variable, register_space

__all__ = ["DCSpace"]

_BASES = ("unipc", "dpmsolver++")
_FINALS = ("sigma_min", "scheduler")
_REFERENCE = {"base": "unipc", "final_sigma": "sigma_min", "target": "reference", "bound": "none"}


def base_schedule(scheduler_config: Mapping[str, Any], base: str, nfe: int, final_sigma: str | None) -> SolverSchedule:
    """The schedule DC ratios are fitted for: UniPC as the reference runs it, or DPM-Solver++(2M)."""
    from difftune.search.dc import reference_schedule

    config = {k: v for k, v in scheduler_config.items() if k != "schedule"}
    if base == "unipc":
        return reference_schedule(config, nfe, final_sigma=final_sigma)
    overrides: dict[str, Any] = {"corrector": False, "solver_order": 2, "predict_x0": True}
    if final_sigma is not None:
        overrides["final_sigmas_type"] = final_sigma
    scheduler = USFScheduler.from_schedule(None, config, **overrides)
    scheduler.set_timesteps(nfe)
    schedule = scheduler.schedule
    assert schedule is not None
    return replace(schedule, final_sigma=final_sigma)


@register_space("dc")
class DCSpace(Space):
    """DC-Solver ratios fitted per schedule; see the module docstring.

    Args:
        iterations, lr, reference_steps: fitting settings passed to
            :func:`~difftune.search.dc.fit_dc_ratios` (defaults: the reference's 20, 0.1, 200).
        cache_dir: where fits are kept (default ``<difftune cache>/dc``).
    """

    default_searcher = "tpe"
    default_budget = 16
    sections = ("solver",)

    def __init__(
        self,
        *,
        iterations: int | None = None,
        lr: float | None = None,
        reference_steps: int | None = None,
        cache_dir: Any = None,
    ) -> None:
        options: dict[str, Any] = {"cache_dir": cache_dir}
        for name, value in (("iterations", iterations), ("lr", lr), ("reference_steps", reference_steps)):
            if value is not None:
                options[name] = value
        self._options = options
        self._fits: dict[tuple[Any, ...], Any] = {}

    @staticmethod
    def _flow(context: SpaceContext) -> bool:
        config = {k: v for k, v in context.scheduler_config.items() if k != "schedule"}
        return bool(USFScheduler.from_schedule(None, config).config.use_flow_sigmas)

    def variables(self, context: SpaceContext) -> list[Variable]:
        lo, hi = context.nfe_range
        out = [
            Variable("nfe", "int", lo, hi, default=(lo + hi) // 2, help="model evaluations (steps)"),
            Variable("base", "categorical", choices=_BASES, default="unipc", help="the schedule the ratios compensate"),
        ]
        if not self._flow(context):
            out.append(
                Variable(
                    "final_sigma",
                    "categorical",
                    choices=_FINALS,
                    default="sigma_min",
                    help="where sampling ends: sigma_min (the reference's) or the scheduler's own",
                )
            )
        out += [
            Variable(
                "target",
                "categorical",
                choices=("reference", "next"),
                default="reference",
                help="fit the last two steps (reference) or only the last (next) against DDIM's final latent",
            ),
            Variable("bound", "categorical", choices=("none", "tanh"), default="none", help="ratio free or 1 ± 0.5"),
        ]
        return out

    def schedule(self, params: Mapping[str, Any], context: SpaceContext) -> SolverSchedule:
        """The point's base schedule, ratios all 1."""
        final = params.get("final_sigma", "scheduler")
        return base_schedule(
            context.scheduler_config, params["base"], int(params["nfe"]), None if final == "scheduler" else final
        )

    def fit(self, params: Mapping[str, Any], context: SpaceContext) -> Any:
        """The :class:`~difftune.search.dc.DCFit` of the point (fitted once, then memoised)."""
        from difftune.search.dc import fit_dc_ratios

        from ._spacing import study_samples_and_call

        samples, call = study_samples_and_call(context, "dc")
        pipe = context.pipeline
        schedule = self.schedule(params, context)
        key = (
            context.info.fingerprint,
            json.dumps(schedule.to_dict(), sort_keys=True),
            context.guidance_scale,
            json.dumps(call, sort_keys=True, default=repr),
            samples,
            params["target"],
            params["bound"],
        )
        if key not in self._fits:
            self._fits[key] = fit_dc_ratios(
                pipe,
                schedule,
                samples,
                guidance_scale=context.guidance_scale,
                call_kwargs=call,
                bound=params["bound"],
                target=params["target"],
                **self._options,
            )
        return self._fits[key]

    def _decode(self, params: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        return {"solver": self.fit(params, context).schedule}

    def encode(self, sections: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """Always :class:`SpaceError`: ratios are fitted, and no point is known to refit to given ones."""
        raise SpaceError(
            "space 'dc' cannot encode a schedule: its ratios are fitted per point; search the 'dc' space from its "
            "baselines, or the 'solver' space to start from a schedule"
        )

    def baselines(self, context: SpaceContext) -> list[NamedPoint]:
        """Plain UniPC (ρ = 1) and DC-Solver's reference setting at every NFE in range."""
        lo, hi = context.nfe_range
        flow = self._flow(context)
        out = []
        for n in range(lo, hi + 1):
            params = {"nfe": n, **_REFERENCE}
            if flow:
                params.pop("final_sigma")
            plain = self.schedule(params, context)
            end = "" if flow else ", ending at sigma_min"
            out.append(
                NamedPoint(f"unipc_nfe{n}", {"solver": plain}, None, f"UniPC as DC-Solver's reference runs it{end}")
            )
            if context.pipeline is not None and n > 2:
                out.append(
                    NamedPoint(
                        f"dc_reference_nfe{n}",
                        self.decode(params, context),
                        params,
                        "DC-Solver's reference setting: UniPC, ratios fitted greedily through the denoiser against "
                        "200-step DDIM (AdamW lr 0.1, 20 iterations per step)",
                    )
                )
        out += self._cpr_points(context)
        return out

    def _cpr_points(self, context: SpaceContext) -> list[NamedPoint]:
        """UniPC with ratios predicted by the model's stored CPR (``difftune cpr``), where there is one."""
        import inspect

        from difftune.search.dc import model_cpr, with_ratios

        cpr = model_cpr(context.info.fingerprint, self._options.get("cache_dir"))
        guidance = context.guidance_scale
        if guidance is None and context.pipeline is not None:
            default = inspect.signature(context.pipeline.__call__).parameters.get("guidance_scale")
            guidance = default.default if default is not None and isinstance(default.default, (int, float)) else None
        if cpr is None or guidance is None:
            return []
        lo, hi = context.nfe_range
        flow = self._flow(context)
        fitted_at = ", ".join(f"{n}@{g:g}" for n, g in cpr.settings)
        out = []
        for n in range(max(lo, 3), hi + 1):
            params = {"nfe": n, **_REFERENCE}
            if flow:
                params.pop("final_sigma")
            schedule = with_ratios(self.schedule(params, context), cpr.ratios(n, float(guidance)))
            out.append(
                NamedPoint(
                    f"dc_cpr_nfe{n}",
                    {"solver": schedule},
                    None,
                    f"UniPC with ratios predicted by the model's stored CPR at guidance {guidance:g} (fitted at "
                    f"NFE@CFG {fitted_at})",
                )
            )
        return out
