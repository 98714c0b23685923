"""``difftune bench joint``: one study over solver × cache × sparsity × quantization against four single ones.

On the embedded model, in one throw-away database (every figure from calibration measurements, the
same ``samples`` calibration samples for every study):

- four single-space studies — ``solver`` (NFE in ``nfe``), ``cache``, ``sada`` and ``quant`` at
  ``steps`` — and one ``joint`` study, each with ``budget`` evaluations of its own (baselines and
  seeds included: equal evaluations) and the joint space's objectives (speedup, PSNR, weight
  memory, class accuracy), so that every study measures and trades the same figures. The joint
  study then also evaluates the naive stacks of the single studies' picks (``--stack-from``),
  which are *not* counted in its hypervolume;
- **hypervolume ratio**: joint front ÷ the best single front, over (speedup ↑, PSNR ↑ capped at
  :data:`PSNR_CAP`, weight compression = plain weight bytes ÷ served ↑), reference point
  :data:`HV_REFERENCE` (0.5×, 20 dB, 0.5×: below the plain pipeline on the two cost axes, so an
  unquantized point and a quantized one that runs no faster both count). Also the same ratio on
  speedup × PSNR alone (solver, cache and sada against joint);
- **stacks**: each naive stack beside the joint search's best point at least as fast and as small
  (PSNR difference), and the stack's PSNR against its floor (each part reached the floor alone);
- **SADA at 50 steps**: a ``sada`` study at 50 steps (``sada_budget`` trials): the fastest searched
  point with PSNR ≥ the reference column's (τ = 0) ÷ that column's speedup;
- **the quant front**: weight memory × PSNR of the ``quant`` study's front.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difftune.benchmarks import Figure, register_benchmark

__all__ = ["HV_REFERENCE", "PSNR_CAP", "bench_joint", "joint_hypervolume"]

#: PSNR above this adds no hypervolume (the identity's "100 dB" would otherwise dwarf every trade-off).
PSNR_CAP = 50.0
#: (speedup, PSNR dB, weight compression) of the hypervolume's reference point.
HV_REFERENCE = (0.5, 20.0, 0.5)


def _point(values: dict[str, float], plain_mb: float, axes: int) -> list[float] | None:
    speed, psnr = values.get("speedup"), values.get("psnr")
    if speed is None or psnr is None:
        return None
    out = [float(speed), min(float(psnr), PSNR_CAP)]
    if axes == 3:
        out.append(plain_mb / float(values.get("weight_memory_mb", plain_mb)))
    return out


def joint_hypervolume(trials: Sequence[Any], plain_mb: float, axes: int = 3) -> float:
    """Hypervolume of the complete ``trials`` over speedup × PSNR (capped) [× weight compression]."""
    from difftune.store._pareto import hypervolume

    points = [p for t in trials if (p := _point(t.values(), plain_mb, axes)) is not None]
    if not points:
        return 0.0
    return hypervolume(points, HV_REFERENCE[:axes], ["maximize"] * axes)


def _stack(trial: Any) -> bool:
    return str((trial.config or {}).get("baseline") or "").startswith("stack_")


@register_benchmark("joint")
def bench_joint(
    budget: int = 64,
    samples: int = 10,
    steps: int = 20,
    seed: int = 0,
    nfe: tuple[int, int] = (4, 8),
    sada_budget: int = 16,
    sada_steps: int = 50,
    progress: Any = None,
    storage: str | None = None,
) -> list[Figure]:
    """See the module docstring."""
    import difftune
    from difftune.accel.quant import served_weight_memory
    from difftune.search.runner import run_study
    from difftune.search.stack import format_stack_report, stack_report
    from difftune.spaces import JointSpace
    from difftune.store import TrialState, get_store

    pipe = difftune.load_pipeline("embedded")
    pipe.set_progress_bar_config(disable=True)
    plain_mb = served_weight_memory(pipe).original_bytes / 2**20
    # Every study measures and trades the same four objectives as the joint one, so that the fronts
    # compare in one space (the quant space alone would not measure speed, the others not memory).
    objectives = JointSpace().default_objectives("embedded")
    common = {"pipeline": pipe, "samples": samples, "seed": seed, "progress": progress, "objectives": objectives}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        url = storage or f"sqlite:///{Path(tmp) / 'bench_joint.db'}"
        singles = ("solver", "cache", "sada", "quant")
        for space in singles:
            started = time.perf_counter()
            run_study(
                "embedded",
                space,
                budget=budget,
                study=f"bj-{space}",
                storage=url,
                num_inference_steps=steps,
                nfe_range=nfe,
                **common,
            )
            seconds[space] = time.perf_counter() - started
        started = time.perf_counter()
        run_study(
            "embedded", "joint", budget=budget, study="bj-joint", storage=url, num_inference_steps=steps, nfe_range=nfe,
            **common,
        )  # fmt: skip
        seconds["joint"] = time.perf_counter() - started
        started = time.perf_counter()
        stacked = run_study(  # the same study, now with the naive stacks as extra baselines
            "embedded", "joint", budget=budget + 3, study="bj-joint", storage=url, num_inference_steps=steps,
            nfe_range=nfe, stack_from=[f"bj-{s}" for s in singles], **common,
        )  # fmt: skip
        seconds["stacks"] = time.perf_counter() - started
        started = time.perf_counter()
        run_study(
            "embedded", "sada", budget=sada_budget, study="bj-sada50", storage=url, num_inference_steps=sada_steps,
            **common,
        )  # fmt: skip
        seconds["sada50"] = time.perf_counter() - started
        with get_store(url) as store:
            trials = {
                s.name: store.list_trials(s.id, TrialState.COMPLETE)
                for s in store.list_studies()
                if s.name.startswith("bj-")
            }
            rows = stack_report(store, stacked.study.id)
            quant_front = store.pareto_front("bj-quant")

    # equal evaluations: the joint study's first `budget` trials that are not stacks (a study with fewer
    # stacks than the 3 extra slots filled the rest with searched points)
    joint = sorted((t for t in trials["bj-joint"] if not _stack(t)), key=lambda t: t.number)[:budget]
    hv = {name[3:]: joint_hypervolume(ts, plain_mb) for name, ts in trials.items() if name[3:] in singles}
    hv["joint"] = joint_hypervolume(joint, plain_mb)
    hv2 = {name[3:]: joint_hypervolume(ts, plain_mb, axes=2) for name, ts in trials.items() if name[3:] in singles}
    hv2["joint"] = joint_hypervolume(joint, plain_mb, axes=2)
    best = max(singles, key=lambda s: hv[s])
    best2 = max(("solver", "cache", "sada"), key=lambda s: hv2[s])
    searched = sum(t.kind in ("searched", "retry") for t in joint)
    context = (
        f"budget {budget} evaluations per study (joint: {searched} searched, the rest baselines and seeds), "
        f"{samples} samples, {steps} steps, NFE {nfe[0]}–{nfe[1]}, searcher seed {seed}; "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    )
    figures = [
        Figure(
            "hypervolume: joint front ÷ best single-space front (speedup × PSNR × weight compression)",
            hv["joint"] / hv[best] if hv[best] > 0 else math.nan,
            ">= 1.1",
            f"joint {hv['joint']:.1f}; " + ", ".join(f"{s} {hv[s]:.1f}" for s in singles) + f"; {context}",
        ),
        Figure(
            "hypervolume: joint ÷ best single (speedup × PSNR only; solver, cache, sada)",
            hv2["joint"] / hv2[best2] if hv2[best2] > 0 else math.nan,
            "",
            f"joint {hv2['joint']:.1f}; " + ", ".join(f"{s} {hv2[s]:.1f}" for s in ("solver", "cache", "sada")),
        ),
    ]
    for row in rows:
        floor = float(row.name.removeprefix("stack_psnr"))
        figures.append(
            Figure(
                f"{row.name}: joint PSNR at ≥ its speed and ≤ its weights − the stack's (dB)",
                row.psnr_gain,
                "",
                f"stack {row.values.get('psnr', math.nan):.1f} dB where each part alone ≥ {floor:g} dB "
                f"({row.values.get('psnr', math.nan) - floor:+.1f} dB); "
                + format_stack_report([row]).replace("\n", " "),
            )
        )
    sada = trials["bj-sada50"]
    column = [t for t in sada if (t.config or {}).get("baseline") == "sada_sd2"]
    if column:
        ref = column[0].values()
        tuned = [
            t.values()
            for t in sada
            if t.kind in ("searched", "retry") and t.values().get("psnr", -math.inf) >= ref["psnr"]
        ]
        fastest = max((v["speedup"] for v in tuned), default=math.nan)
        figures.append(
            Figure(
                f"SADA at {sada_steps} steps: fastest searched at PSNR ≥ τ = 0's ÷ τ = 0 (reference SD-2 column)",
                fastest / ref["speedup"],
                ">= 1.0",
                f"τ = 0: {ref['speedup']:.2f}× at {ref['psnr']:.1f} dB; tuned {fastest:.2f}× "
                f"({len(tuned)} of {sum(t.kind == 'searched' for t in sada)} searched points at ≥ that PSNR; "
                f"budget {sada_budget}, {samples} samples)",
            )
        )
    points = sorted((t.values()["weight_memory_mb"], t.values()["psnr"], t.kind) for t in quant_front)
    figures.append(
        Figure(
            "quant front: smallest weights at PSNR ≥ 30 dB ÷ plain",
            min((mb for mb, db, _ in points if db >= 30), default=math.nan) / plain_mb,
            "",
            "front (MB / dB / kind): " + "; ".join(f"{mb:.2f} / {min(db, 100):.1f} / {k}" for mb, db, k in points),
        )
    )
    return figures
