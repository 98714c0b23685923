"""Serving formats of `difftune export`: cache-dit's YAML (read back by cache-dit's own loader and run by
cache-dit on tiny pipelines), SGLang-diffusion's environment file, vLLM-Omni's cache config."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cache_dit
import numpy as np
import pytest
import torch

import difftune
from difftune.accel.cache import CacheMaskConfig, FORAConfig
from difftune.accel.delta_dit import DeltaDiTConfig
from difftune.accel.first_block_cache import FirstBlockCacheConfig
from difftune.accel.quant import QuantConfig, QuantSpec
from difftune.accel.sada import SADAConfig
from difftune.accel.taylorseer import TaylorSeerConfig
from difftune.search.export import export_point
from difftune.search.serving_formats import (
    CACHE_DIT_FILE,
    SGLANG_ENV_FILE,
    VLLM_OMNI_FILE,
    serving_pieces,
)
from difftune.spaces import SpaceContext, to_profile
from difftune.store import get_store
from tests.models.tiny_pipelines import build

STEPS = 8

pytestmark = pytest.mark.usefixtures("one_thread")


def _profile(pipe, steps: int = STEPS, **sections):
    return to_profile(sections, SpaceContext.from_pipeline(pipe, num_inference_steps=steps), name="point")


def _whole_step_mask(pipe, compute: list[int]) -> CacheMaskConfig:
    info = difftune.describe(pipe)
    mask = np.zeros(info.mask_shape(len(compute)), dtype=bool)
    for s, bit in enumerate(compute):
        mask[s] = bool(bit)
    return CacheMaskConfig.from_array(info.components, mask)


def _load(tmp_path: Path, text: str):
    """cache-dit's own loader, on the file as written."""
    path = tmp_path / CACHE_DIT_FILE
    path.write_text(text)
    return cache_dit.load_configs(str(path))


def _env(text: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")]
    assert all(len(p) == 2 and p[0].isidentifier() for p in pairs), text
    return dict(pairs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# What cache-dit's loader reads back
# --------------------------------------------------------------------------------------------


def test_first_block_cache_is_dbcache_fn1_bn0_with_its_threshold(tmp_path, embedded_pipe):
    pieces = serving_pieces(_profile(embedded_pipe, cache=FirstBlockCacheConfig(0.12)), embedded_pipe, "cache-dit")
    assert pieces.not_expressible == {} and pieces.note() is None and "cache" in pieces.expressible
    loaded = _load(tmp_path, pieces.files[CACHE_DIT_FILE])
    config = loaded["cache_config"]
    assert (config.Fn_compute_blocks, config.Bn_compute_blocks) == (1, 0)
    assert config.residual_diff_threshold == 0.12
    assert (config.max_warmup_steps, config.max_cached_steps, config.max_continuous_cached_steps) == (0, -1, -1)
    assert config.steps_computation_mask is None and loaded["calibrator_config"] is None
    assert config.num_inference_steps == STEPS
    usage = pieces.files["cache_dit_usage.json"]
    assert set(usage) >= {"profile", "expressible", "not_expressible", "usage"}


def test_a_tiny_threshold_is_written_as_a_yaml_float(tmp_path, embedded_pipe):
    pieces = serving_pieces(_profile(embedded_pipe, cache=FirstBlockCacheConfig(1e-5)), embedded_pipe, "cache-dit")
    assert _load(tmp_path, pieces.files[CACHE_DIT_FILE])["cache_config"].residual_diff_threshold == 1e-5


@pytest.mark.parametrize(
    ("cache", "expected"),
    [
        ("mask", [1, 0, 1, 1, 0, 0, 1, 0]),
        (FORAConfig(interval=3), [1, 0, 0, 1, 0, 0, 1, 0]),
        (TaylorSeerConfig(interval=3, order=2, warmup=2), [1, 1, 0, 0, 1, 0, 0, 1]),
    ],
)
def test_whole_step_schedules_become_a_static_steps_computation_mask(tmp_path, embedded_pipe, cache, expected):
    if cache == "mask":
        cache = _whole_step_mask(embedded_pipe, [0, 0, 1, 1, 0, 0, 1, 0])  # step 0 computes anyway
    pieces = serving_pieces(_profile(embedded_pipe, cache=cache), embedded_pipe, "cache-dit")
    assert pieces.not_expressible == {} and "cache" in pieces.differences
    loaded = _load(tmp_path, pieces.files[CACHE_DIT_FILE])
    config = loaded["cache_config"]
    assert config.steps_computation_mask == expected
    assert config.steps_computation_policy == "static"
    assert (config.Fn_compute_blocks, config.Bn_compute_blocks, config.max_warmup_steps) == (1, 0, 0)
    if isinstance(cache, TaylorSeerConfig):
        calibrator = loaded["calibrator_config"]
        assert calibrator.calibrator_type == "taylorseer" and calibrator.taylorseer_order == 2
        assert "TaylorSeer" in pieces.differences["cache"]
    else:
        assert loaded["calibrator_config"] is None


def test_what_cache_dit_cannot_express_is_listed_with_the_reason(tmp_path, embedded_pipe):
    info = difftune.describe(embedded_pipe)
    mask = np.ones(info.mask_shape(STEPS), dtype=bool)
    mask[1:, 1:] = False  # the first block recomputes every step, the others are reused: per block
    per_block = CacheMaskConfig.from_array(info.components, mask)
    quant = QuantConfig(default=QuantSpec(weight_bits=8))
    profile = _profile(embedded_pipe, steps=50, cache=per_block.resample(50), sparsity=SADAConfig(), quantization=quant)
    for fmt in ("cache-dit", "sglang", "vllm-omni"):
        pieces = serving_pieces(profile, embedded_pipe, fmt)
        assert set(pieces.not_expressible) == {"cache", "sparsity", "quantization"}
        assert "per-block" in pieces.not_expressible["cache"] and "SADA" in pieces.not_expressible["sparsity"]
        assert CACHE_DIT_FILE not in pieces.files and VLLM_OMNI_FILE not in pieces.files
        usage = pieces.files[f"{fmt.replace('-', '_')}_usage.json"]
        assert usage["not_expressible"] == pieces.not_expressible
        note = pieces.note()
        assert note is not None and "difftune.apply_profile" in note
    delta = serving_pieces(_profile(embedded_pipe, cache=DeltaDiTConfig()), embedded_pipe, "cache-dit")
    assert "Δ-DiT" in delta.not_expressible["cache"]


# --------------------------------------------------------------------------------------------
# SGLang and vLLM-Omni
# --------------------------------------------------------------------------------------------


def test_sglang_env_matches_the_yaml(tmp_path, embedded_pipe):
    cache = _whole_step_mask(embedded_pipe, [1, 1, 0, 0, 1, 0, 1, 1])
    pieces = serving_pieces(_profile(embedded_pipe, cache=cache), embedded_pipe, "sglang")
    config = _load(tmp_path, pieces.files[CACHE_DIT_FILE])["cache_config"]
    env = _env(pieces.files[SGLANG_ENV_FILE])
    assert env["SGLANG_CACHE_DIT_ENABLED"] == "true"
    assert int(env["SGLANG_CACHE_DIT_FN"]) == config.Fn_compute_blocks
    assert int(env["SGLANG_CACHE_DIT_BN"]) == config.Bn_compute_blocks
    assert int(env["SGLANG_CACHE_DIT_WARMUP"]) == config.max_warmup_steps
    assert float(env["SGLANG_CACHE_DIT_RDT"]) == config.residual_diff_threshold
    assert int(env["SGLANG_CACHE_DIT_MC"]) == config.max_continuous_cached_steps
    assert env["SGLANG_CACHE_DIT_TAYLORSEER"] == "false"
    assert env["SGLANG_CACHE_DIT_SCM_PRESET"] == "none"
    assert env["SGLANG_CACHE_DIT_SCM_POLICY"] == config.steps_computation_policy == "static"
    # SGLang parses the bins as comma-separated ints and hands them to cache-dit's steps_mask
    compute = [int(x) for x in env["SGLANG_CACHE_DIT_SCM_COMPUTE_BINS"].split(",")]
    cached = [int(x) for x in env["SGLANG_CACHE_DIT_SCM_CACHE_BINS"].split(",")]
    assert (compute, cached) == ([2, 1, 2], [2, 1])
    assert cache_dit.steps_mask(compute_bins=compute, cache_bins=cached, total_steps=STEPS) == (
        config.steps_computation_mask
    )


def test_sglang_env_of_first_block_cache_and_taylorseer(embedded_pipe):
    fbc = serving_pieces(_profile(embedded_pipe, cache=FirstBlockCacheConfig(0.2)), embedded_pipe, "sglang")
    env = _env(fbc.files[SGLANG_ENV_FILE])
    assert float(env["SGLANG_CACHE_DIT_RDT"]) == 0.2 and env["SGLANG_CACHE_DIT_SCM_POLICY"] == "dynamic"
    assert "SGLANG_CACHE_DIT_SCM_COMPUTE_BINS" not in env
    seer = TaylorSeerConfig(interval=2, order=1, warmup=1)
    ts = serving_pieces(_profile(embedded_pipe, cache=seer), embedded_pipe, "sglang")
    env = _env(ts.files[SGLANG_ENV_FILE])
    assert env["SGLANG_CACHE_DIT_TAYLORSEER"] == "true" and env["SGLANG_CACHE_DIT_TS_ORDER"] == "1"


def test_vllm_omni_config_has_its_keys(embedded_pipe):
    pieces = serving_pieces(_profile(embedded_pipe, cache=FirstBlockCacheConfig(0.1)), embedded_pipe, "vllm-omni")
    data = pieces.files[VLLM_OMNI_FILE]
    assert data["cache_backend"] == "cache_dit"
    assert set(data["cache_config"]) == {
        "Fn_compute_blocks",
        "Bn_compute_blocks",
        "max_warmup_steps",
        "max_cached_steps",
        "residual_diff_threshold",
        "max_continuous_cached_steps",
        "enable_taylorseer",
        "taylorseer_order",
    }
    assert data["cache_config"]["residual_diff_threshold"] == 0.1 and data["cache_config"]["Fn_compute_blocks"] == 1
    # vLLM-Omni takes step masks only from cache-dit's presets
    fora = serving_pieces(_profile(embedded_pipe, cache=FORAConfig(2)), embedded_pipe, "vllm-omni")
    assert "scm_steps_mask_policy" in fora.not_expressible["cache"] and VLLM_OMNI_FILE not in fora.files


# --------------------------------------------------------------------------------------------
# cache-dit running the exported configs (CPU)
# --------------------------------------------------------------------------------------------


def _block_calls(transformer, modules) -> Counter:
    """How many of ``modules`` (one per block) run in each denoiser call."""
    calls: Counter = Counter()
    step = {"n": -1}
    transformer.register_forward_pre_hook(lambda *_: step.__setitem__("n", step["n"] + 1))
    for module in modules:
        module.register_forward_pre_hook(lambda *_: calls.update([step["n"]]))
    return calls


def _digits(pipe, steps: int) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    return pipe(class_labels=[1, 7], generator=generators, num_inference_steps=steps, output_type="pt").images


def test_cache_dit_runs_first_block_cache_exactly_as_difftune(tmp_path):
    ours_pipe = difftune.load_pipeline("embedded")
    theirs_pipe = difftune.load_pipeline("embedded")
    for pipe in (ours_pipe, theirs_pipe):
        pipe.set_progress_bar_config(disable=True)
    blocks = len(difftune.describe(ours_pipe).blocks)
    steps, config = 10, FirstBlockCacheConfig(0.15)
    pieces = serving_pieces(_profile(ours_pipe, steps=steps, cache=config), ours_pipe, "cache-dit")
    # a block difftune skips is still entered (its wrapper returns early): count its first norm instead
    ours_calls = _block_calls(ours_pipe.transformer, [b.norm1 for b in ours_pipe.transformer.transformer_blocks])
    handle = config.apply(ours_pipe)
    try:
        ours = _digits(ours_pipe, steps)
    finally:
        handle.remove()
    # difftune's embedded pipeline is not a registered cache-dit pipeline; its DiTTransformer2DModel is
    cache_dit.enable_cache(theirs_pipe.transformer, **_load(tmp_path, pieces.files[CACHE_DIT_FILE]))
    theirs_calls = _block_calls(theirs_pipe.transformer, [b.norm1 for b in theirs_pipe.transformer.transformer_blocks])
    try:
        theirs = _digits(theirs_pipe, steps)
    finally:
        cache_dit.disable_cache(theirs_pipe.transformer)
    skipped = [s for s in range(steps) if ours_calls[s] == 1]
    assert skipped and all(ours_calls[s] == blocks for s in range(steps) if s not in skipped)
    assert theirs_calls == ours_calls
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_cache_dit_skips_exactly_the_masked_steps_of_a_tiny_flux_pipeline(tmp_path):
    pipe, kwargs = build("flux")
    kwargs.update(negative_prompt=None, true_cfg_scale=1.0, num_inference_steps=6)  # one denoiser call per step
    compute = [1, 0, 1, 0, 0, 1]
    profile = _profile(pipe, steps=6, cache=_whole_step_mask(pipe, compute))
    pieces = serving_pieces(profile, pipe, "cache-dit")
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    cache_dit.enable_cache(pipe, **_load(tmp_path, pieces.files[CACHE_DIT_FILE]))
    try:
        for _ in range(2):  # a second call gets a fresh context (num_inference_steps in the config)
            calls = _block_calls(pipe.transformer, blocks)
            pipe(**kwargs)
            # a masked step runs the first block only (Fn_compute_blocks=1), a computed step all of them
            assert [calls[s] for s in range(6)] == [len(blocks) if c else 1 for c in compute]
    finally:
        cache_dit.disable_cache(pipe)


def test_cache_dit_runs_the_taylorseer_export_on_its_full_steps(tmp_path):
    pipe = difftune.load_pipeline("embedded")
    pipe.set_progress_bar_config(disable=True)
    seer = TaylorSeerConfig(interval=3, order=2, warmup=2)
    pieces = serving_pieces(_profile(pipe, cache=seer), pipe, "cache-dit")
    options = _load(tmp_path, pieces.files[CACHE_DIT_FILE])
    assert options["calibrator_config"].taylorseer_order == 2
    cache_dit.enable_cache(pipe.transformer, **options)
    calls = _block_calls(pipe.transformer, [b.norm1 for b in pipe.transformer.transformer_blocks])
    try:
        images = _digits(pipe, STEPS)
    finally:
        cache_dit.disable_cache(pipe.transformer)
    blocks = len(pipe.transformer.transformer_blocks)
    assert [calls[s] for s in range(STEPS)] == [blocks if seer.is_full_step(s) else 1 for s in range(STEPS)]
    assert torch.isfinite(images).all()


# --------------------------------------------------------------------------------------------
# Through export_point
# --------------------------------------------------------------------------------------------


def _study_with(tmp_path: Path, pipe, sections: dict) -> str:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    info = difftune.describe(pipe)
    profile = _profile(pipe, **sections)
    with get_store(url) as store:
        model = store.create_model("embedded", info.family, info.fingerprint)
        study = store.create_study(
            "p",
            model_id=model.id,
            space="cache",
            searcher="random",
            objectives=["speedup", "psnr"],
            reference={"model": "embedded", "num_inference_steps": STEPS, "samples": 2, "metrics": ["psnr"]},
        )
        trial = store.add_trial(study.id, {}, config={"profile": profile.to_dict()})
        store.set_trial_state(trial.id, "complete", metrics={"speedup": 1.0, "psnr": 40.0})
    return url


def test_export_point_writes_the_serving_directories(tmp_path, embedded_pipe):
    url = _study_with(tmp_path, embedded_pipe, {"cache": FORAConfig(interval=2)})
    out = tmp_path / "cd"
    result = export_point(url, "p", "fastest", out, format="cache-dit", validate=False, pipeline=embedded_pipe)
    assert result.path == out and result.notes == ()
    assert sorted(p.name for p in out.iterdir()) == ["cache_dit.yaml", "cache_dit_usage.json", "profile.json"]
    assert difftune.load_profile(out / "profile.json").cache == FORAConfig(interval=2)
    config = cache_dit.load_configs(str(out / CACHE_DIT_FILE))["cache_config"]
    assert config.steps_computation_mask == [1, 0] * (STEPS // 2)
    usage = json.loads((out / "cache_dit_usage.json").read_text())
    assert "cache" in usage["expressible"] and "cache" in usage["differences"]

    export_point(url, "p", "fastest", tmp_path / "sg", format="sglang", validate=False, pipeline=embedded_pipe)
    assert sorted(p.name for p in (tmp_path / "sg").iterdir()) == [
        "cache_dit.yaml",
        "profile.json",
        "sglang.env",
        "sglang_usage.json",
    ]
    result = export_point(
        url, "p", "fastest", tmp_path / "vo", format="vllm-omni", validate=False, pipeline=embedded_pipe
    )
    [note] = result.notes  # a step mask has no vLLM-Omni setting
    assert "vLLM-Omni" in note and "cache" in note
    assert sorted(p.name for p in (tmp_path / "vo").iterdir()) == ["profile.json", "vllm_omni_usage.json"]
