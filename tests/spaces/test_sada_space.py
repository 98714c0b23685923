"""The ``sada`` space: SADA's knobs as shares of the steps, the reference's columns as baselines."""

from __future__ import annotations

import numpy as np
import pytest

import difftune
from difftune.accel.sada import SADAConfig
from difftune.errors import SpaceError
from difftune.spaces import SpaceContext, get_space

from .contract import SpaceContract


class TestSADASpace(SpaceContract):
    """The contract every space passes (repair, decode, profile round trip, apply, baselines)."""

    space_name = "sada"


def _context(pipe, steps):
    return SpaceContext.from_pipeline(pipe, num_inference_steps=steps)


def test_the_defaults_are_the_reference_sd2_column_at_50_steps(embedded_pipe):
    space, ctx = get_space("sada"), _context(embedded_pipe, 50)
    config = space.decode(space.default_params(ctx), ctx)["sparsity"]
    # TECHNIQUES.md §6, SD-2 at 50 steps: acc_range (10, 47), lagrange 4 / 24 / 4, 3×3 windows, 5120.
    assert config == SADAConfig()
    names = {b.name: b for b in space.baselines(ctx)}
    assert set(names) == {"sada_off", "sada_sd2", "sada_sdxl", "sada_flux"}
    assert names["sada_sdxl"].sections["sparsity"] == SADAConfig(max_downsample=2, max_fix=10240)
    assert names["sada_flux"].sections["sparsity"] == SADAConfig(
        max_downsample=0, max_fix=0, lagrange_step=20, lagrange_term=3
    )
    off = names["sada_off"].sections["sparsity"]
    assert off.acc_range[0] >= off.acc_range[1]  # SADA's own "off"


def test_positions_scale_with_the_steps_and_the_lagrange_start_stays_on_its_grid(embedded_pipe):
    space, ctx = get_space("sada"), _context(embedded_pipe, 20)
    config = space.decode(space.default_params(ctx), ctx)["sparsity"]
    # 10/50·20 = 4, 47/50·20 = 18.8 → 19; 24/50·20 = 9.6 → 10, down to a multiple of 4 → 8.
    assert config.acc_range == (4, 19) and config.lagrange_step == 8
    params = {**space.default_params(ctx), "lagrange_int": 3, "lagrange_start": 0.9}
    assert space.decode(params, ctx)["sparsity"].lagrange_step == 18  # 18 = 6·3
    params = {**params, "lagrange_int": 6, "lagrange_start": 0.2}
    assert space.decode(params, ctx)["sparsity"].lagrange_step == 6  # round(4) → 0, at least one interval


def test_random_points_decode_and_encode_back(embedded_pipe):
    space, ctx = get_space("sada"), _context(embedded_pipe, 20)
    rng = np.random.default_rng(0)
    for _ in range(20):
        config = space.decode(space.sample(ctx, rng), ctx)["sparsity"]
        assert config.lagrange_step % config.lagrange_int == 0 and config.acc_range[0] < config.acc_range[1]
        assert space.decode(space.encode({"sparsity": config}, ctx), ctx)["sparsity"] == config
    with pytest.raises(SpaceError, match="outside the space"):
        space.encode({"sparsity": SADAConfig(max_interval=9)}, ctx)
    with pytest.raises(SpaceError, match="sparsity section only"):
        space.encode({"cache": None, "sparsity": None}, ctx)
    with pytest.raises(SpaceError, match="at least 4 steps"):
        space.variables(_context(embedded_pipe, 3))


def test_families_without_token_pruning_get_none():
    from tests.models.tiny_pipelines import build

    pipe, _ = build("flux")
    space, ctx = get_space("sada"), _context(pipe, 20)
    names = {v.name for v in space.variables(ctx)}
    assert not names & {"sx", "sy", "max_downsample", "max_fix"}
    assert all(not b.sections["sparsity"].prunes_tokens for b in space.baselines(ctx))
    assert [b.name for b in space.baselines(ctx)] == ["sada_off", "sada_flux"]
    with pytest.raises(SpaceError, match="no token pruning"):
        space.encode({"sparsity": SADAConfig()}, ctx)


@pytest.mark.usefixtures("one_thread")
def test_a_sada_study_on_the_embedded_model(tmp_path, embedded_pipe):
    from difftune.search import run_study
    from difftune.store import TrialState, get_store

    url = f"sqlite:///{tmp_path / 's.db'}"
    tiny = {"samples": 2, "num_inference_steps": 12, "latency_repeats": 1}
    result = run_study(pipeline=embedded_pipe, space="sada", budget=6, storage=url, **tiny)
    assert result.finished == 6 and result.failed == 0
    with get_store(url) as store:
        trials = store.list_trials(result.study.id, TrialState.COMPLETE)
    baselines = {t.config["baseline"]: t for t in trials if t.kind == "baseline"}
    assert {"sada_off", "sada_sd2"} <= set(baselines)
    assert baselines["sada_off"].values()["psnr"] == pytest.approx(100.0)  # the plain pipeline, bit for bit
    assert baselines["sada_sd2"].values()["nfe"] < baselines["sada_off"].values()["nfe"]  # steps skipped
    for trial in trials:
        profile = difftune.load_profile(trial.config["profile"])
        assert profile.sparsity is not None and profile.cache is None
