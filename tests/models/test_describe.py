"""describe() against the real structure of each family's denoiser, observed during a real pipeline call."""

from __future__ import annotations

import copy

import pytest
import torch

import difftune
from difftune.models import fingerprint
from tests.models.tiny_pipelines import FAMILIES, build

EXPECTED_COMPONENTS = {
    "embedded": ("attn1", "ff"),
    "dit": ("attn1", "ff"),
    "pixart": ("attn1", "attn2", "ff"),
    "sd": ("resnets", "attentions"),
    "sdxl": ("resnets", "attentions"),
    "sd3": ("attn", "ff", "ff_context"),
    "flux": ("attn", "ff", "ff_context"),
}


def _observe_first_forward(pipe, info, call):
    """Run ``call`` and record, for the denoiser's first forward, the order blocks ran and which slot modules ran."""
    denoiser = getattr(pipe, info.denoiser)
    order: list[str] = []
    ran: set[str] = set()
    forwards = [0]
    handles = [denoiser.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))]

    def record(name, into):
        def hook(*_):
            if forwards[0] == 1:
                into(name)

        return hook

    for block in info.block_info:
        handles.append(denoiser.get_submodule(block.name).register_forward_pre_hook(record(block.name, order.append)))
        for slot in block.components:
            for path in slot:
                handles.append(denoiser.get_submodule(path).register_forward_hook(record(path, ran.add)))
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    return order, ran


def _check(pipe, info, family, call):
    assert info.family == family
    assert info.components == EXPECTED_COMPONENTS[family]
    assert len(info.blocks) == len(info.block_info) >= 2
    assert info.mask_shape(7) == (7, len(info.blocks), len(info.components))
    denoiser = getattr(pipe, info.denoiser)
    assert type(denoiser).__name__ == info.denoiser_class
    for block in info.block_info:
        assert len(block.components) == len(info.components)
    order, ran = _observe_first_forward(pipe, info, call)
    # blocks in execution order, each run exactly once per denoiser call (no block missing, none extra)
    assert order == list(info.blocks)
    declared = {p for b in info.block_info for slot in b.components for p in slot}
    assert declared and declared == ran
    # the fingerprint is the weights': a copy has the same, a changed weight changes it
    fp = fingerprint(denoiser)
    assert fp == info.fingerprint == fingerprint(copy.deepcopy(denoiser))
    param = next(denoiser.parameters())
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(1e-3)
        changed = fingerprint(denoiser)
        param.copy_(saved)  # exactly: p + 1e-3 - 1e-3 is not p in floating point
    assert changed != fp
    assert fingerprint(denoiser) == fp


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_matches_each_family(family):
    pipe, kwargs = build(family)
    info = difftune.describe(pipe)
    _check(pipe, info, family, lambda: pipe(**kwargs))


def test_describe_embedded(embedded_pipe):
    info = difftune.describe(embedded_pipe)
    n_layers = embedded_pipe.transformer.config.num_layers
    assert info.blocks == tuple(f"transformer_blocks.{i}" for i in range(n_layers))
    assert info.conditioning == "class"
    _check(embedded_pipe, info, "embedded", lambda: embedded_pipe(prompt="3", num_inference_steps=2))
    assert difftune.describe(difftune.load_pipeline("embedded")).fingerprint == info.fingerprint


def test_unet_families_report_deepcache_branches():
    for family in ("sd", "sdxl"):
        pipe, _ = build(family)
        info = difftune.describe(pipe)
        n = len(pipe.unet.down_blocks)
        assert info.branches == tuple((f"down_blocks.{i}", f"up_blocks.{n - 1 - i}") for i in range(n))
        kinds = [b.kind for b in info.block_info]
        assert kinds == ["down"] * n + ["mid"] + ["up"] * len(pipe.unet.up_blocks)
        # a block without cross-attention has an inert 'attentions' slot
        assert any(b.components[1] == () for b in info.block_info)


def test_flux_single_blocks_map_onto_the_same_slots():
    pipe, _ = build("flux")
    info = difftune.describe(pipe)
    single = [b for b in info.block_info if b.kind == "single"]
    assert single[0].components[1][0].endswith("proj_mlp")
    assert single[0].components[2][0].endswith("proj_out")
    n_double = len(pipe.transformer.transformer_blocks)
    assert [b.kind for b in info.block_info] == ["double"] * n_double + ["single"] * len(single)


def test_unknown_pipeline_raises_model_error_listing_families():
    class NotAPipeline:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(difftune.ModelError, match="supported families") as caught:
        difftune.describe(NotAPipeline())
    assert all(family in str(caught.value) for family in EXPECTED_COMPONENTS)
