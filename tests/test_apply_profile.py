"""Every technique through apply_profile on the embedded model and tiny models of other families."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import difftune
from difftune.accel.cache import CacheMaskConfig, FORAConfig
from difftune.accel.solver import SolverSchedule
from difftune.profile import ModelRef, Profile, ProfileContext
from tests.models.tiny_pipelines import build, torch_threads


def _profile(pipe, steps, **sections) -> Profile:
    info = difftune.describe(pipe)
    return Profile(
        name="t",
        model=ModelRef("m", info.family, info.fingerprint),
        context=ProfileContext(num_inference_steps=steps),
        **sections,
    )


def test_dpm_solver_pp_2m_equivalence_through_apply_profile(embedded_pipe):
    """INTERFACE.md: order 2, data prediction, no corrector (order 1 first and last) on the timesteps
    DPMSolverMultistepScheduler picks = DPM-Solver++(2M)."""
    steps = 8
    schedule = SolverSchedule.from_scheduler(embedded_pipe.scheduler, steps)
    assert [s.order for s in schedule.steps] == [1] + [2] * (steps - 2) + [1]
    assert all(s.prediction == "data" and not s.corrector for s in schedule.steps)

    def run():
        return embedded_pipe(
            class_labels=[2, 8],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(4),
            output_type="pt",
        ).images

    reference = run()
    original_scheduler = embedded_pipe.scheduler
    handle = difftune.apply_profile(embedded_pipe, _profile(embedded_pipe, steps, solver=schedule))
    assert type(embedded_pipe.scheduler).__name__ == "USFScheduler"
    tuned = run()
    handle.remove()
    assert embedded_pipe.scheduler is original_scheduler
    torch.testing.assert_close(tuned, reference, atol=1e-4, rtol=0)
    assert torch.equal(run(), reference)


def test_solver_and_cache_combine_and_undo_in_order(embedded_pipe):
    steps = 6
    info = difftune.describe(embedded_pipe)
    mask = np.ones(info.mask_shape(steps), dtype=bool)
    mask[2::2, 3:] = False
    schedule = SolverSchedule.from_scheduler(embedded_pipe.scheduler, steps, corrector=True)
    profile = _profile(embedded_pipe, steps, solver=schedule, cache=CacheMaskConfig.from_array(info.components, mask))

    def run():
        return embedded_pipe(
            class_labels=[1, 3],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    before = run()
    handle = difftune.apply_profile(embedded_pipe, profile)
    both = run()
    handle.remove()
    solver_only = difftune.apply_profile(embedded_pipe, _profile(embedded_pipe, steps, solver=schedule))
    only = run()
    solver_only.remove()
    assert not torch.equal(both, only) and not torch.equal(only, before)
    assert torch.equal(run(), before)


def test_a_failing_section_undoes_the_ones_already_applied(embedded_pipe):
    steps = 4
    bad_cache = CacheMaskConfig.from_array(["attn1", "attn2", "ff"], np.ones((steps, 6, 3)))
    schedule = SolverSchedule.from_scheduler(embedded_pipe.scheduler, steps)
    original = embedded_pipe.scheduler
    with pytest.raises(difftune.ProfileError, match="slots"):
        difftune.apply_profile(embedded_pipe, _profile(embedded_pipe, steps, solver=schedule, cache=bad_cache))
    assert embedded_pipe.scheduler is original
    assert "forward" not in embedded_pipe.transformer.__dict__


def _section(technique: str, pipe, info, steps: int) -> dict:
    """One profile section per technique, at a setting that must change a 4-step run's output."""
    from difftune.accel.deepcache import DeepCacheConfig
    from difftune.accel.delta_dit import DeltaDiTConfig
    from difftune.accel.first_block_cache import FirstBlockCacheConfig
    from difftune.accel.quant import QuantConfig, QuantSpec
    from difftune.accel.sada import SADAConfig
    from difftune.accel.taylorseer import TaylorSeerConfig

    if technique == "solver":
        return {"solver": SolverSchedule.from_scheduler(pipe.scheduler, steps, order=2, corrector=True)}
    if technique == "mask":
        mask = np.ones(info.mask_shape(steps), dtype=bool)
        mask[1::2] = False
        return {"cache": CacheMaskConfig.from_array(info.components, mask)}
    if technique == "sada":
        return {
            "sparsity": SADAConfig(
                threshold=float("inf"), acc_range=(0, steps), max_interval=1, lagrange_term=0, max_downsample=0
            )
        }
    if technique == "quant":
        return {"quantization": QuantConfig("simulated", QuantSpec(4))}
    configs = {
        "fora": FORAConfig(interval=2),
        "taylorseer": TaylorSeerConfig(interval=2, order=1, warmup=1),
        "deepcache": DeepCacheConfig(interval=2, branch=0),
        "delta_dit": DeltaDiTConfig(interval=2, switch_step=2, num_cached_blocks=1),
        "first_block_cache": FirstBlockCacheConfig(threshold=10.0),
    }
    return {"cache": configs[technique]}


COMMON = ["solver", "mask", "fora", "taylorseer", "sada", "quant"]
CASES = (
    [("sd", t) for t in [*COMMON, "deepcache"]]
    + [("pixart", t) for t in [*COMMON, "delta_dit", "first_block_cache"]]
    + [("dit", t) for t in ["solver", "mask", "delta_dit", "first_block_cache"]]
)


@pytest.mark.parametrize(("family", "technique"), CASES)
def test_techniques_apply_and_remove_on_other_families(family, technique):
    """Every technique through apply_profile on a tiny UNet and a tiny PixArt / DiT: it changes the output,
    and removing it restores the plain pipeline exactly."""
    with torch_threads(1):
        pipe, kwargs = build(family)
        # SADA decides from step 3 on (it needs three drifts) and skips the step after: give it room
        steps = kwargs["num_inference_steps"] = 8 if technique == "sada" else 4
        info = difftune.describe(pipe)

        def run():
            return pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images

        before = run()
        handle = difftune.apply_profile(pipe, _profile(pipe, steps, **_section(technique, pipe, info, steps)))
        tuned = run()
        handle.remove()
        assert np.isfinite(tuned).all() and tuned.shape == before.shape
        assert not np.array_equal(tuned, before)
        np.testing.assert_array_equal(run(), before)
