"""Quantization: the arithmetic by hand, JSON round trip, exact removal, per-layer scope, torchao, memory."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import warnings

import pytest
import torch
from torch import nn

import difftune
from difftune.accel import config_from_dict
from difftune.accel.quant import (
    QuantConfig,
    QuantSpec,
    apply_quantization,
    dequantize_rows,
    fake_quantize,
    quantization_report,
    quantize_rows,
    torchao_available,
    weight_memory_bytes,
)
from tests.models.tiny_pipelines import build, torch_threads

STEPS = 6
INTERFACE_EXAMPLE = {
    "backend": "simulated",
    "default": {"weight_bits": 16, "activation_bits": 16},
    "layers": {"transformer_blocks.3.ff": {"weight_bits": 4, "activation_bits": 8}},
}
KEEP_PATCH_CONV = {"pos_embed": QuantSpec()}  # torchao quantizes Linears only; the embedded DiT has one Conv2d


def _run(pipe, steps=STEPS):
    return pipe(
        class_labels=[1, 4, 7],
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def _snapshot(module):
    return {name: (p, p.data_ptr(), p.detach().clone()) for name, p in module.named_parameters()}


def _assert_restored(module, snapshot):
    current = dict(module.named_parameters())
    assert current.keys() == snapshot.keys()
    for name, (param, ptr, value) in snapshot.items():
        assert current[name] is param and param.data_ptr() == ptr and torch.equal(param, value), name
    for sub in module.modules():
        assert "forward" not in sub.__dict__ and "extra_repr" not in sub.__dict__
    assert quantization_report(module) == {}


# --- the arithmetic ------------------------------------------------------------------------------


def test_per_channel_symmetric_8_and_4_bit_by_hand():
    w = torch.tensor([[0.30, -0.75, 0.10, 0.52], [2.0, -1.0, 0.25, 0.0]])
    r4 = quantize_rows(w, 4)
    # 4 bits: levels -8..7, scale = max|row| / 7.5
    assert torch.allclose(r4.scale[:, 0], torch.tensor([0.75 / 7.5, 2.0 / 7.5]))
    assert r4.q.tolist() == [[3, -8, 1, 5], [7, -4, 1, 0]]  # 0.30/0.1 = 3, -0.75/0.1 = -7.5 -> -8 (half to even), ...
    expected = torch.tensor([[0.3, -0.8, 0.1, 0.5], [7 * 2 / 7.5, -4 * 2 / 7.5, 2 / 7.5, 0.0]])
    assert torch.allclose(dequantize_rows(r4), expected)
    for bits in (8, 4):
        r = quantize_rows(w, bits)
        scale = r.scale  # one per output channel
        assert scale.shape == (2, 1)
        assert torch.allclose(scale[:, 0], w.abs().amax(1) / (2 ** (bits - 1) - 0.5))
        fake = fake_quantize(w, bits)
        levels = fake / scale
        assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the grid
        assert levels.min() >= -(2 ** (bits - 1)) and levels.max() <= 2 ** (bits - 1) - 1
        assert ((fake - w).abs() <= scale / 2 + 1e-7).all()


def test_asymmetric_uses_a_zero_point_and_keeps_zero_exact():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 3.1]])
    r = quantize_rows(x, 4, symmetric=False)
    assert r.zero_point.item() == 0 and r.scale.item() == pytest.approx(3.1 / 15)
    y = torch.tensor([[-1.0, 0.0, 2.0]])
    r = quantize_rows(y, 4, symmetric=False)
    assert r.scale.item() == pytest.approx(3.0 / 15) and r.zero_point.item() == 5  # -(-1) / 0.2
    assert dequantize_rows(r)[0, 1].item() == 0.0
    assert ((dequantize_rows(r) - y).abs() <= r.scale / 2 + 1e-7).all()


def test_group_wise_scales_follow_each_group():
    row = torch.cat([torch.full((4,), 0.01), torch.full((4,), 5.0), torch.tensor([0.5, -0.2])])  # last group short
    r = quantize_rows(row[None], 8, group_size=4)
    assert r.scale.shape == (1, 3)
    assert torch.allclose(r.scale[0], torch.tensor([0.01, 5.0, 0.5]) / 127.5)
    channel_error = (fake_quantize(row[None], 4) - row).abs()[0]
    group_error = (fake_quantize(row[None], 4, group_size=4) - row).abs()[0]
    assert torch.equal(channel_error[:4], row[:4])  # one scale for the row rounds the small group to 0
    assert (group_error[:4] <= 0.01 / 7.5 / 2 + 1e-9).all() and group_error.mean() < channel_error.mean()
    # a Conv2d weight is grouped along its flattened in × kh × kw
    conv = nn.Conv2d(2, 3, 2)
    with torch.no_grad():
        conv.weight[0, 1] = 4.0
    expected = fake_quantize(conv.weight.detach()[0, 0].reshape(1, 4), 4).view(2, 2)
    handle = apply_quantization(conv, QuantConfig(default=QuantSpec(4, granularity="group", group_size=4)))
    assert torch.equal(conv.weight[0, 0], expected)
    handle.remove()


# --- the config ----------------------------------------------------------------------------------


def test_json_round_trip_and_registry():
    config = config_from_dict("quantization", INTERFACE_EXAMPLE)
    assert isinstance(config, QuantConfig)
    assert config.layers["transformer_blocks.3.ff"] == QuantSpec(weight_bits=4, activation_bits=8)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["layers"] == INTERFACE_EXAMPLE["layers"]  # a layer lists only what differs from default
    assert QuantConfig.from_dict(data) == config
    full = QuantConfig(
        backend="torchao",
        default=QuantSpec(8, 8, activation_granularity="token", activation_symmetric=False),
        layers={"a.b": QuantSpec(4, 16, "group", 64, False, "tensor", True), "a": QuantSpec()},
    )
    again = QuantConfig.from_dict(json.loads(json.dumps(full.to_dict())))
    assert again == full and hash(again) == hash(full)
    assert pickle.loads(pickle.dumps(full)) == full
    # layers inherit the default's other fields
    inherited = QuantConfig.from_dict({"default": {"weight_bits": 8, "granularity": "group"}, "layers": {"x": {}}})
    assert inherited.layers["x"] == inherited.default


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"backend": "cuda"}, "quantization.backend"),
        ({"default": {"weight_bits": 3}}, "quantization.default.weight_bits"),
        ({"default": {"weight_bits": 8.0}}, "quantization.default.weight_bits"),
        ({"default": {"activation_bits": 4}}, "quantization.default.activation_bits"),
        ({"default": {"granularity": "tensor"}}, "quantization.default.granularity"),
        ({"default": {"group_size": 0}}, "quantization.default.group_size"),
        ({"default": {"symmetric": 1}}, "quantization.default.symmetric"),
        ({"default": {"activation_granularity": "channel"}}, "quantization.default.activation_granularity"),
        ({"default": {"activation_symmetric": "yes"}}, "quantization.default.activation_symmetric"),
        ({"default": {"bits": 8}}, "quantization.default: unknown key"),
        ({"layers": {"a": {"weight_bits": 2}}}, "quantization.layers['a'].weight_bits"),
        ({"layers": {"a": 8}}, "quantization.layers['a']"),
        ({"layers": {"": {}}}, "quantization.layers"),
        ({"layers": [1]}, "quantization.layers"),
        ({"weights": 8}, "quantization: unknown key"),
    ],
)
def test_every_field_is_validated(data, field):
    with pytest.raises(difftune.ProfileError, match=re.escape(field)):
        QuantConfig.from_dict(data)


def test_longest_matching_path_wins_on_dot_boundaries():
    eight, four = QuantSpec(8), QuantSpec(4)
    config = QuantConfig(layers={"blocks.1": eight, "blocks.1.ff": four})
    assert config.spec_for("blocks.1.ff.net.2") is four
    assert config.spec_for("blocks.1.attn.to_q") is eight
    assert config.spec_for("blocks.10.ff") == QuantSpec()  # "blocks.1" is no prefix of "blocks.10"
    with pytest.raises(difftune.ProfileError, match=r"QuantSpec\.weight_bits"):
        QuantSpec(weight_bits=5)


def test_weight_memory_of_a_tiny_linear_by_hand():
    linear = nn.Linear(64, 32)  # 2048 weights + 32 biases, float32: 8320 bytes
    w8 = weight_memory_bytes(linear, QuantConfig(default=QuantSpec(weight_bits=8)))
    assert (w8.original_bytes, w8.quantized_bytes, w8.quantized_layers) == (8320, 2048 + 32 * 4 + 128, 1)
    w4 = weight_memory_bytes(
        linear, QuantConfig(default=QuantSpec(weight_bits=4, granularity="group", group_size=16, symmetric=False))
    )
    # 1024 bytes of nibbles + 32 rows × 4 groups × (4-byte scale + 1-byte zero point) + the bias
    assert w4.quantized_bytes == 1024 + 128 * 5 + 128
    assert weight_memory_bytes(linear, QuantConfig(default=QuantSpec(activation_bits=8))).quantized_bytes == 8320
    assert w8.ratio == pytest.approx(8320 / 2304)


# --- on the embedded pipeline --------------------------------------------------------------------


def test_16_16_everywhere_is_bit_identical(embedded_pipe):
    base = _run(embedded_pipe)
    handle = config_from_dict("quantization", {"default": {"weight_bits": 16, "activation_bits": 16}}).apply(
        embedded_pipe
    )
    assert handle.report == {}
    assert torch.equal(_run(embedded_pipe), base)
    handle.remove()


def test_apply_remove_restores_outputs_and_weights_exactly_and_error_grows_as_bits_shrink(embedded_pipe):
    base = _run(embedded_pipe)
    snapshot = _snapshot(embedded_pipe.transformer)
    errors = {}
    for name, spec in {
        "W8A16": QuantSpec(8),
        "W4A16": QuantSpec(4),
        "W4A8g": QuantSpec(4, 8, "group", 32, False, "token", False),
    }.items():
        handle = QuantConfig(default=spec).apply(embedded_pipe)
        assert quantization_report(embedded_pipe) == handle.report
        assert set(handle.report.values()) == {"simulated"} and len(handle.report) == 57  # 56 Linears + 1 Conv2d
        errors[name] = (_run(embedded_pipe) - base).abs().mean().item()
        with pytest.raises(difftune.ProfileError, match="already quantized"):
            QuantConfig(default=spec).apply(embedded_pipe)
        handle.remove()
        handle.remove()  # idempotent
        _assert_restored(embedded_pipe.transformer, snapshot)
        assert torch.equal(_run(embedded_pipe), base)
    assert 0 < errors["W8A16"] < errors["W4A16"]


def test_overrides_touch_only_the_named_layers(embedded_pipe):
    transformer = embedded_pipe.transformer
    snapshot = _snapshot(transformer)
    config = QuantConfig.from_dict(INTERFACE_EXAMPLE)
    handle = config.apply(embedded_pipe)
    changed = [name for name, (p, _, value) in snapshot.items() if not torch.equal(p, value)]
    wrapped = [name for name, m in transformer.named_modules() if "forward" in m.__dict__]
    handle.remove()
    ff = "transformer_blocks.3.ff"
    assert changed == [f"{ff}.net.0.proj.weight", f"{ff}.net.2.weight"]  # biases stay, nothing else moves
    assert wrapped == [f"{ff}.net.0.proj", f"{ff}.net.2"]
    assert set(handle.report) == set(wrapped)
    # activation-only: weights untouched, inputs quantized
    base = _run(embedded_pipe, steps=2)
    handle = QuantConfig(layers={ff: QuantSpec(activation_bits=8)}).apply(embedded_pipe)
    assert all(torch.equal(p, value) for p, _, value in snapshot.values())
    assert not torch.equal(_run(embedded_pipe, steps=2), base)
    handle.remove()
    _assert_restored(transformer, snapshot)


def test_unknown_layer_path_lists_valid_ones(embedded_pipe):
    with pytest.raises(difftune.ProfileError, match=r"'transformer_blocks\.3\.fff' is not a module.*blocks\.3\.ff,"):
        QuantConfig(layers={"transformer_blocks.3.fff": QuantSpec(8)}).apply(embedded_pipe)
    with pytest.raises(difftune.ProfileError, match="is a LayerNorm with no Linear or Conv2d"):
        QuantConfig(layers={"transformer_blocks.0.norm3": QuantSpec(8)}).apply(embedded_pipe)
    with pytest.raises(difftune.ProfileError, match="valid paths include: pos_embed"):
        QuantConfig(layers={"unet.down_blocks": QuantSpec(8)}).apply(embedded_pipe)
    assert quantization_report(embedded_pipe) == {}


def test_quantization_goes_through_a_profile(embedded_pipe):
    from difftune.profile import ModelRef, Profile, ProfileContext

    info = difftune.describe(embedded_pipe)
    profile = Profile(
        name="w4a8-ff3",
        model=ModelRef(name="embedded", family=info.family, fingerprint=info.fingerprint),
        context=ProfileContext(num_inference_steps=STEPS, guidance_scale=1.5),
        quantization=QuantConfig.from_dict(INTERFACE_EXAMPLE),
    )
    assert difftune.load_profile(json.loads(profile.to_json())) == profile
    base = _run(embedded_pipe)
    handle = difftune.apply_profile(embedded_pipe, profile)
    accelerated = _run(embedded_pipe)
    handle.remove()
    assert not torch.equal(accelerated, base)
    assert torch.equal(_run(embedded_pipe), base)


# --- torchao -------------------------------------------------------------------------------------


def _need_torchao() -> None:
    """Skip without a usable torchao, unless CI_REQUIRE_TORCHAO=1 (.ci/run sets it): then that is a failure."""
    import importlib.util
    import os

    if importlib.util.find_spec("torchao") is None:
        reason = "torchao is not installed (pip install --no-deps torchao)"
    elif not torchao_available():
        reason = "torchao is installed but does not import with this torch"
    else:
        return
    if os.environ.get("CI_REQUIRE_TORCHAO") == "1":
        pytest.fail(f"{reason}, and CI_REQUIRE_TORCHAO=1: the int8 CPU kernel tests must run", pytrace=False)
    pytest.skip(reason)


def _denoise(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, 16, generator=g)
    with torch.no_grad():
        return pipe.transformer(x, timestep=torch.full((4,), 500), class_labels=torch.tensor([0, 3, 7, 10])).sample


def test_torchao_int8_weight_only_matches_simulated(embedded_pipe):
    _need_torchao()
    transformer = embedded_pipe.transformer
    snapshot = _snapshot(transformer)
    base = _denoise(embedded_pipe)
    handle = QuantConfig("simulated", QuantSpec(8), KEEP_PATCH_CONV).apply(embedded_pipe)
    simulated_weight = transformer.transformer_blocks[2].ff.net[2].weight.detach().clone()
    simulated = _denoise(embedded_pipe)
    handle.remove()
    handle = QuantConfig("torchao", QuantSpec(8), KEEP_PATCH_CONV).apply(embedded_pipe)
    assert set(handle.report.values()) == {"torchao:int8_weight_only"} and len(handle.report) == 56
    assert torch.equal(transformer.transformer_blocks[2].ff.net[2].weight.dequantize(), simulated_weight)
    real = _denoise(embedded_pipe)
    handle.remove()
    _assert_restored(transformer, snapshot)
    assert torch.equal(_denoise(embedded_pipe), base)
    assert (real - simulated).abs().max() < 1e-4 < (real - base).abs().max()


@pytest.mark.parametrize(("per_token", "symmetric"), [(False, True), (True, False)])
def test_torchao_int8_dynamic_matches_simulated_on_a_linear(per_token, symmetric):
    _need_torchao()
    torch.manual_seed(0)
    linear, x = nn.Linear(128, 64), torch.randn(3, 10, 128) * 3 + 1
    spec = QuantSpec(8, 8, activation_granularity="token" if per_token else "tensor", activation_symmetric=symmetric)
    out = {}
    for backend in ("simulated", "torchao"):
        handle = QuantConfig(backend, spec).apply(linear)
        with torch.no_grad():
            out[backend] = linear(x)
        out[backend + " report"] = handle.report
        handle.remove()
    assert out["torchao report"] == {"": "torchao:int8_dynamic_activation_int8_weight"}
    assert torch.allclose(out["torchao"], out["simulated"], atol=1e-4)


def test_torchao_without_a_kernel_is_an_error_or_a_simulated_fallback(embedded_pipe):
    snapshot = _snapshot(embedded_pipe.transformer)
    reason = r"'pos_embed\.proj': torchao quantizes nn\.Linear layers only" if torchao_available() else "torchao"
    with pytest.raises(difftune.ProfileError, match=f"{reason}.*backend 'simulated'"):
        QuantConfig("torchao", QuantSpec(8)).apply(embedded_pipe)
    _assert_restored(embedded_pipe.transformer, snapshot)
    with pytest.warns(UserWarning, match="simulating"):
        handle = QuantConfig("torchao", QuantSpec(4)).apply(embedded_pipe, strict=False)
    assert set(handle.report.values()) == {"simulated"}  # int4 needs CUDA (and torchao)
    handle.remove()
    _assert_restored(embedded_pipe.transformer, snapshot)


def test_torchao_missing_says_how_to_install_it(embedded_pipe, monkeypatch):
    from difftune.accel import quant

    monkeypatch.setattr(quant, "_torchao", lambda: (None, "torchao cannot be imported (No module named 'torchao')"))
    config = QuantConfig("torchao", QuantSpec(8), KEEP_PATCH_CONV)
    with pytest.raises(difftune.ProfileError, match=r"cannot be imported.*backend 'simulated'"):
        config.apply(embedded_pipe)
    with pytest.warns(UserWarning, match="simulating every layer"):
        handle = config.apply(embedded_pipe, strict=False)
    assert set(handle.report.values()) == {"simulated"} and len(handle.report) == 56
    handle.remove()
    assert "pip install --no-deps torchao" in quant._INSTALL_HINT


@pytest.mark.cuda
def test_torchao_int4_weight_only_on_cuda():
    pytest.importorskip("torchao")
    linear = nn.Linear(256, 128).to("cuda", torch.bfloat16)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    spec = QuantSpec(4, granularity="group", group_size=64, symmetric=False)
    with torch.no_grad():
        exact = linear(x).float()
    handle = QuantConfig("torchao", spec).apply(linear)
    assert handle.report == {"": "torchao:int4_weight_only"}
    with torch.no_grad():
        real = linear(x).float()
    handle.remove()
    handle = QuantConfig("simulated", spec).apply(linear)
    with torch.no_grad():
        simulated = linear(x).float()
    handle.remove()
    with torch.no_grad():
        assert torch.equal(linear(x).float(), exact)  # removed: the bf16 weights are back
    # torchao's tinygemm int4 keeps its zero point in the float domain, the simulation in the integer one:
    # the two grids differ, so each is compared with the unquantized layer, not with the other. Both are
    # real 4-bit errors (not zero, far below the output's scale) and the kernel's is no worse.
    real_error = (real - exact).abs().mean()
    simulated_error = (simulated - exact).abs().mean()
    scale = exact.abs().mean()
    assert 0 < simulated_error < 0.1 * scale and 0 < real_error < 0.1 * scale
    assert real_error < 1.5 * simulated_error, (float(real_error), float(simulated_error))


# --- other families ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "pixart", "dit"])
def test_runs_on_tiny_unet_and_transformers(family):
    with torch_threads(1):
        pipe, kwargs = build(family)
        denoiser = pipe.unet if family == "sd" else pipe.transformer
        snapshot = _snapshot(denoiser)
        base = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
        spec = QuantSpec(4, 8, "group", 16, False, "token", False)
        handle = QuantConfig(default=spec).apply(pipe)
        quantized = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
        kinds = {type(denoiser.get_submodule(path)).__name__ for path in handle.report}
        handle.remove()
        _assert_restored(denoiser, snapshot)
        again = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    assert kinds == {"Linear", "Conv2d"}  # the UNet's convolutions, the transformers' patch embedding
    assert quantized.shape == base.shape and not (quantized == base).all()
    assert (again == base).all()


def test_dataclass_replace_inherits_in_python():
    default = QuantSpec(8, granularity="group", group_size=64)
    layer = dataclasses.replace(default, weight_bits=4)
    config = QuantConfig(default=default, layers={"x": layer})
    assert config.to_dict()["layers"] == {"x": {"weight_bits": 4}}


def test_no_warning_when_nothing_is_quantized(embedded_pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuantConfig("torchao").apply(embedded_pipe).remove()


def test_a_cache_section_applies_after_torchao_quantization(embedded_pipe):
    """apply_profile describes the pipeline for each section: the fingerprint must hash torchao's tensors."""
    _need_torchao()
    from difftune.accel.cache import FORAConfig
    from difftune.profile import ModelRef, Profile, ProfileContext

    info = difftune.describe(embedded_pipe)
    profile = Profile(
        name="q+c",
        model=ModelRef("embedded", info.family, info.fingerprint),
        context=ProfileContext(num_inference_steps=6),
        quantization=QuantConfig("torchao", QuantSpec(8), KEEP_PATCH_CONV),
        cache=FORAConfig(interval=2),
    )
    base = _run(embedded_pipe)
    handle = difftune.apply_profile(embedded_pipe, profile)
    quantized_fp = difftune.describe(embedded_pipe).fingerprint
    out = _run(embedded_pipe)
    handle.remove()
    assert quantized_fp != info.fingerprint  # the quantized weights hash differently
    assert not torch.equal(out, base) and torch.isfinite(out).all()
    assert torch.equal(_run(embedded_pipe), base)
    assert difftune.describe(embedded_pipe).fingerprint == info.fingerprint


def test_served_weight_memory_reads_torchaos_own_storage(embedded_pipe):
    # int8 weights and one float32 scale per output channel: what the simulated count predicts, now measured.
    _need_torchao()
    from difftune.accel.quant import served_weight_memory

    config = QuantConfig("torchao", QuantSpec(8), KEEP_PATCH_CONV)
    predicted = weight_memory_bytes(embedded_pipe, config)
    handle = config.apply(embedded_pipe)
    try:
        served = served_weight_memory(embedded_pipe)
    finally:
        handle.remove()
    assert served.quantized_layers == 56
    assert served.original_bytes == predicted.original_bytes
    assert abs(served.quantized_bytes - predicted.quantized_bytes) <= 0.02 * predicted.quantized_bytes
    assert served.quantized_bytes < predicted.original_bytes / 3
