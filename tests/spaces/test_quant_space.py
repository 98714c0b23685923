"""The ``quant`` space: per-block bits, the sensitivity seeds, weight memory as served, a real study."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import difftune
from difftune.accel.quant import QuantConfig, QuantSpec, served_weight_memory, weight_memory_bytes
from difftune.errors import SpaceError
from difftune.evaluators import Sample
from difftune.evaluators.sensitivity import REST, quantization_sensitivity
from difftune.spaces import QuantSpace, SpaceContext, get_space

from .contract import SpaceContract

pytestmark = pytest.mark.usefixtures("one_thread")


class TestQuantSpace(SpaceContract):
    space_name = "quant"
    random_points = 12
    applied_points = 2

    @classmethod
    def make_context(cls, pipe: Any) -> SpaceContext:
        return SpaceContext.from_pipeline(pipe, num_inference_steps=4, keep_pipeline=False)


@pytest.fixture(scope="module")
def context(embedded_pipe) -> SpaceContext:
    return SpaceContext.from_pipeline(
        embedded_pipe, num_inference_steps=4, spacing_samples=(Sample(3, 0), Sample(7, 1))
    )


def test_a_point_is_one_spec_per_block_and_rest(context):
    space = get_space("quant")
    assert isinstance(space, QuantSpace)
    names = [v.name for v in space.variables(context)]
    assert names[:4] == ["w_0", "a_0", "w_1", "a_1"] and "w_rest" in names and "a_rest" in names
    params = {
        **space.default_params(context),
        "w_2": 4,
        "a_2": 8,
        "w_rest": 8,
        "granularity": "group",
        "group_size": 32,
    }
    config = space.decode(params, context)["quantization"]
    assert config.default == QuantSpec(weight_bits=8, granularity="group", group_size=32)
    assert config.spec_for("transformer_blocks.2.attn1.to_q") == QuantSpec(4, 8, "group", 32)
    assert config.spec_for("transformer_blocks.0.ff.net.2") == QuantSpec(16, 16, "group", 32)
    assert config.spec_for("proj_out") == config.default
    assert space.encode({"quantization": config}, context) == space.repair(params, context).params
    repaired = space.repair({**params, "granularity": "channel", "group_size": 64}, context)
    assert repaired.params["group_size"] == 128 and "no effect" in repaired.changes[0]
    with pytest.raises(SpaceError, match="not whole blocks"):
        space.encode({"quantization": QuantConfig(layers={"transformer_blocks.1.ff": QuantSpec(4)})}, context)
    with pytest.raises(SpaceError, match="backend"):
        space.encode({"quantization": QuantConfig(backend="torchao")}, context)
    assert space.default_objectives("embedded")[0] == ("weight_memory_mb", "minimize")
    assert space.default_objectives("sd")[2] == ("sharpness", "maximize")


def test_served_weight_memory_counts_bits_and_scales(embedded_pipe):
    plain = served_weight_memory(embedded_pipe)
    assert (
        plain.quantized_bytes
        == plain.original_bytes
        == sum(p.numel() * p.element_size() for p in embedded_pipe.transformer.parameters())
    )
    config = QuantConfig(default=QuantSpec(weight_bits=8), layers={"transformer_blocks.0": QuantSpec(weight_bits=4)})
    handle = config.apply(embedded_pipe)
    try:
        served = served_weight_memory(embedded_pipe)
    finally:
        handle.remove()
    assert served == weight_memory_bytes(embedded_pipe, config)  # simulated: what a real kernel would store
    assert served.quantized_bytes < plain.quantized_bytes / 3
    assert served_weight_memory(embedded_pipe) == plain  # removed: nothing active


def test_sensitivity_ranks_units_and_is_cached(embedded_pipe, tmp_path):
    samples = [Sample(3, 0), Sample(7, 1)]
    units = ["transformer_blocks.0", "transformer_blocks.5", REST]
    call = {"num_inference_steps": 4}
    found = quantization_sensitivity(embedded_pipe, units, samples, call_kwargs=call, cache_dir=tmp_path)
    assert not found.from_cache and set(found.weights) == set(units)
    assert all(10 < v < 100 for v in [*found.weights.values(), *found.activations.values()])
    # The value is the PSNR of that unit alone at W4 against the plain images: recompute one by hand.
    from difftune.evaluators import generate
    from difftune.evaluators.quality import psnr_per_image

    plain = generate(embedded_pipe, samples, call)
    handle = QuantConfig(layers={"transformer_blocks.5": QuantSpec(weight_bits=4)}).apply(embedded_pipe)
    try:
        quantized = generate(embedded_pipe, samples, call)
    finally:
        handle.remove()
    assert found.weights["transformer_blocks.5"] == pytest.approx(float(psnr_per_image(quantized, plain).mean()))
    assert found.ranked("weights")[0] == max(units, key=lambda u: found.weights[u])
    again = quantization_sensitivity(embedded_pipe, units, samples, call_kwargs=call, cache_dir=tmp_path)
    assert again.from_cache and dict(again.weights) == dict(found.weights)


def test_seeds_follow_the_measured_sensitivity(embedded_pipe, context, tmp_path):
    space = get_space("quant", cache_dir=tmp_path)
    seeds = {p.name: p for p in space.seeds(context)}
    assert set(seeds) == {"sens_w4_half", "sens_w4_but_one", "sens_w8a8_but_one"}
    found = space.sensitivity(context)
    ranked = found.ranked("weights")
    half = seeds["sens_w4_half"].sections["quantization"]
    for unit in ranked[: len(ranked) // 2]:
        path = "proj_out" if unit == REST else f"{unit}.ff.net.2"
        assert half.spec_for(path).weight_bits == 4
    for unit in ranked[len(ranked) // 2 :]:
        path = "proj_out" if unit == REST else f"{unit}.ff.net.2"
        assert half.spec_for(path).weight_bits == 8
    assert get_space("quant").seeds(context.replace(pipeline=None)) == []


def test_a_quant_study_measures_weight_memory_and_exports_a_smaller_profile(tmp_path, embedded_pipe):
    from difftune.search import run_study
    from difftune.store import TrialState, get_store

    url = f"sqlite:///{tmp_path / 'q.db'}"
    tiny = {"samples": 2, "num_inference_steps": 4, "latency_repeats": 1}
    result = run_study(pipeline=embedded_pipe, space="quant", budget=10, storage=url, **tiny)
    assert result.finished == 10 and result.failed == 0
    assert [s.name for s in result.objectives] == ["weight_memory_mb", "psnr", "class_accuracy"]
    with get_store(url) as store:
        trials = store.list_trials(result.study.id, TrialState.COMPLETE)
    by_name = {t.config.get("baseline"): t for t in trials}
    plain, w4 = by_name["w16a16"].values(), by_name["w4a16"].values()
    assert plain["psnr"] == pytest.approx(100.0) and plain["weight_memory_mb"] == pytest.approx(8.099, abs=1e-3)
    assert w4["weight_memory_mb"] < plain["weight_memory_mb"] / 6 and w4["psnr"] < plain["psnr"]
    assert {t.kind for t in trials} >= {"baseline", "seed", "searched"}
    for trial in trials:
        profile = difftune.load_profile(trial.config["profile"])
        assert profile.quantization is not None and profile.quantization.backend == "simulated"
    from difftune.cli import _select_hint

    assert _select_hint(result.study, trials).startswith("smallest where psnr>=")  # the printed next command
    searched = next(t for t in trials if t.kind == "searched")
    handle = difftune.apply_profile(embedded_pipe, difftune.load_profile(searched.config["profile"]))
    try:
        images = embedded_pipe(class_labels=[3], num_inference_steps=4, output_type="pt").images
    finally:
        handle.remove()
    assert torch.isfinite(images).all()
