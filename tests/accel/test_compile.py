"""Profiles on a torch.compile'd denoiser: the same images as eager, and no recompilation per step.

Dynamo's ``eager`` backend traces and guards exactly as inductor does but skips code generation, so
these tests count graphs in seconds; ``difftune bench runtime`` times the inductor build.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import difftune
from difftune.accel.cache import CacheMaskConfig, FORAConfig
from difftune.profile import ModelRef, Profile, ProfileContext

pytestmark = pytest.mark.usefixtures("one_thread")


def _profile(pipe, steps: int, cache) -> Profile:
    info = difftune.describe(pipe)
    return Profile(
        name="compile",
        model=ModelRef(name=info.name, family=info.family, fingerprint=info.fingerprint),
        context=ProfileContext(num_inference_steps=steps),
        cache=cache,
    )


def _run(pipe, steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=[1, 7], num_inference_steps=steps, generator=generator, output_type="pt").images


def _mask(pipe, steps: int) -> CacheMaskConfig:
    info = difftune.describe(pipe)
    rng = np.random.default_rng(0)
    mask = rng.random((steps, len(info.blocks), len(info.components))) < 0.5
    mask[0] = True
    mask[steps // 2] = False  # a step that reuses every block (the fast path)
    return CacheMaskConfig.from_array(info.components, mask)


@pytest.mark.parametrize("order", ["compile_then_apply", "apply_then_compile"])
def test_a_profile_on_a_compiled_denoiser_matches_eager_and_compiles_once_per_kind_of_step(order):
    from torch._dynamo.utils import counters

    graphs = {}
    for steps in (8, 16):
        pipe = difftune.load_pipeline("embedded")  # a fresh one: compile() sticks to its module
        pipe.set_progress_bar_config(disable=True)
        profile = _profile(pipe, steps, _mask(pipe, steps))
        handle = difftune.apply_profile(pipe, profile)
        eager = _run(pipe, steps)
        handle.remove()
        torch._dynamo.reset()
        counters.clear()
        if order == "compile_then_apply":
            pipe.transformer.compile(backend="eager")
            handle = difftune.apply_profile(pipe, profile)
        else:
            handle = difftune.apply_profile(pipe, profile)
            pipe.transformer.compile(backend="eager")
        first = _run(pipe, steps)
        after_first = counters["stats"]["unique_graphs"]
        second = _run(pipe, steps)
        assert torch.equal(first, eager) and torch.equal(second, eager)
        assert counters["stats"]["unique_graphs"] == after_first  # the second run compiles nothing new
        graphs[steps] = after_first
        handle.remove()
        torch._dynamo.reset()
    # twice the steps, the same graphs: compilation is per kind of step, not per step
    assert graphs[8] == graphs[16] > 0


def test_fora_and_its_removal_on_a_compiled_denoiser():
    pipe = difftune.load_pipeline("embedded")
    pipe.set_progress_bar_config(disable=True)
    plain = _run(pipe, 8)
    torch._dynamo.reset()
    pipe.transformer.compile(backend="eager")
    handle = difftune.apply_profile(pipe, _profile(pipe, 8, FORAConfig(interval=2)))
    tuned = _run(pipe, 8)
    handle.remove()
    assert not torch.equal(tuned, plain) and torch.equal(_run(pipe, 8), plain)
    torch._dynamo.reset()
