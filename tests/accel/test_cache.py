"""Cache schedules: exactness, reversibility, CFG halves, step-count checks, FLOP accounting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import difftune
from difftune.accel._reused_blocks import Shared
from difftune.accel.cache import CacheMaskConfig, CachePolicy, FORAConfig, apply_cache_schedule
from difftune.accel.flops import component_flops, count_flops
from tests.models.tiny_pipelines import build, torch_threads

STEPS = 6


def _run(pipe, steps=STEPS, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    kw.setdefault("class_labels", [1, 4, 7])
    return pipe(num_inference_steps=steps, output_type="pt", **kw).images


def _mask(info, steps=STEPS, every=2):
    mask = np.ones(info.mask_shape(steps), dtype=bool)
    mask[np.arange(steps) % every != 0] = False
    return mask


def test_all_ones_mask_is_bit_identical_and_remove_restores(embedded_pipe):
    info = difftune.describe(embedded_pipe)
    base = _run(embedded_pipe)
    handle = apply_cache_schedule(embedded_pipe, CacheMaskConfig.from_array(info.components, _mask(info, every=1)))
    assert torch.equal(_run(embedded_pipe), base)
    handle.remove()
    handle = apply_cache_schedule(embedded_pipe, CacheMaskConfig.from_array(info.components, _mask(info)))
    cached = _run(embedded_pipe)
    handle.remove()
    assert not torch.equal(cached, base)
    assert torch.equal(_run(embedded_pipe), base)
    for module in embedded_pipe.transformer.modules():
        assert "forward" not in module.__dict__
    assert "set_timesteps" not in embedded_pipe.scheduler.__dict__


def test_reuse_returns_the_exact_output_of_the_last_computed_step(embedded_pipe):
    """Hand-derived: with attn1 of block 2 reused at odd steps, its output at step 2k+1 equals step 2k's."""
    info = difftune.describe(embedded_pipe)
    mask = np.ones(info.mask_shape(STEPS), dtype=bool)
    mask[1::2, 2, 0] = False
    module = embedded_pipe.transformer.transformer_blocks[2].attn1
    ran, returned = [], []
    # a hook on a child fires only when attn1's own forward really runs
    hook = module.to_q.register_forward_hook(lambda m, a, out: ran.append(1))
    outer = module.register_forward_hook(lambda m, a, out: returned.append(out))
    handle = apply_cache_schedule(embedded_pipe, CacheMaskConfig.from_array(info.components, mask))
    try:
        _run(embedded_pipe)
    finally:
        handle.remove()
        hook.remove()
        outer.remove()
    assert len(ran) == STEPS // 2 and len(returned) == STEPS
    for step in range(1, STEPS, 2):
        # the cache's copy of step 2k's output; the list above holds it, so later steps never rewrite it
        assert torch.equal(returned[step], returned[step - 1]) and returned[step] is not returned[step - 1]
    assert not torch.equal(returned[2], returned[0])


def test_stored_outputs_are_rewritten_in_place_unless_something_holds_them(monkeypatch, embedded_pipe):
    """On the CPU a cache keeps a component's output in a buffer of its own, rewritten at every computed
    step and run (the plain pipeline's allocation pattern); a buffer that other code still holds (a
    reference or a view) is left alone and a new one is made."""
    import difftune.accel.cache as cache_module

    caches = []
    real_init = cache_module._ComponentCache.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(cache_module._ComponentCache, "__init__", init)
    info = difftune.describe(embedded_pipe)
    mask = np.ones(info.mask_shape(STEPS), dtype=bool)
    mask[1::2, 2, 0] = False
    module = embedded_pipe.transformer.transformer_blocks[2].attn1
    computed: list[torch.Tensor] = []
    outer = module.register_forward_hook(lambda m, a, out: computed.append(out.clone()))

    def run(seed: int) -> None:
        computed.clear()
        _run(embedded_pipe, generator=torch.Generator().manual_seed(seed))

    handle = apply_cache_schedule(embedded_pipe, CacheMaskConfig.from_array(info.components, mask))
    try:
        (cache,) = caches
        run(0)
        first = cache.store[0][1]
        ptr = first.data_ptr()
        del first
        run(1)
        # the same buffer for both runs, holding the last computed step's output of the second
        assert cache.store[0][1].data_ptr() == ptr and torch.equal(cache.store[0][1], computed[-2])
        view = cache.store[0][1][0]  # only a view of the buffer is held
        kept = view.clone()
        run(2)
        assert torch.equal(view, kept) and cache.store[0][1].data_ptr() != ptr
        assert torch.equal(cache.store[0][1], computed[-2])
        held = cache.store[0][1]  # a reference
        kept = held.clone()
        run(3)
        assert torch.equal(held, kept) and cache.store[0][1] is not held
        assert torch.equal(cache.store[0][1], computed[-2]) and not torch.equal(held, computed[-2])
    finally:
        handle.remove()
        outer.remove()


def test_fora_equals_its_mask_and_runs_any_step_count(embedded_pipe):
    info = difftune.describe(embedded_pipe)
    handle = FORAConfig(interval=2).apply(embedded_pipe)
    fora = _run(embedded_pipe)
    other_steps = _run(embedded_pipe, steps=4)
    handle.remove()
    handle = apply_cache_schedule(embedded_pipe, FORAConfig(interval=2).to_mask(info, STEPS))
    assert torch.equal(_run(embedded_pipe), fora)
    handle.remove()
    assert other_steps.shape == fora.shape


def test_step_count_mismatch_is_an_error_in_strict_mode(embedded_pipe):
    info = difftune.describe(embedded_pipe)
    config = CacheMaskConfig.from_array(info.components, _mask(info))
    handle = apply_cache_schedule(embedded_pipe, config)
    with pytest.raises(difftune.ProfileError, match=f"num_inference_steps={STEPS}"):
        _run(embedded_pipe, steps=STEPS + 2)
    handle.remove()
    handle = apply_cache_schedule(embedded_pipe, config, strict=False)
    with pytest.warns(UserWarning, match="recompute everything"):
        _run(embedded_pipe, steps=STEPS + 2)
    handle.remove()


def test_mask_for_another_model_is_refused(embedded_pipe):
    bad = CacheMaskConfig.from_array(["attn1", "attn2", "ff"], np.ones((STEPS, 6, 3)))
    with pytest.raises(difftune.ProfileError, match="slots"):
        apply_cache_schedule(embedded_pipe, bad)
    info = difftune.describe(embedded_pipe)
    wrong_blocks = CacheMaskConfig.from_array(info.components, np.ones((STEPS, 5, 2)))
    with pytest.raises(difftune.ProfileError, match="5 blocks"):
        apply_cache_schedule(embedded_pipe, wrong_blocks)


def test_cfg_halves_batched_equal_separate_unconditional_calls():
    """A pipeline that runs cond and uncond as two denoiser calls per step (Flux true CFG) caches each
    separately: reusing must give the same as caching nothing whenever the mask is all ones, and the
    two calls of a step must never return each other's features."""
    with torch_threads(1):
        pipe, kwargs = build("flux")
        info = difftune.describe(pipe)
        steps = kwargs["num_inference_steps"] = 4
        calls = []
        hook = pipe.transformer.register_forward_hook(lambda m, a, out: calls.append(1))
        pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)})
        hook.remove()
        assert len(calls) == 2 * steps  # the pipeline really makes two calls per step
        mask = np.ones(info.mask_shape(steps), dtype=bool)
        # Reuse only the ff slot: a block reusing every component skips its modules altogether (the fast
        # path, tests/accel/test_cache_fast_path.py), and this test is about what the hooks return.
        mask[1::2, :, 1] = False
        module = pipe.transformer.transformer_blocks[0].ff
        ran, returned = [], []
        hook = module.net[0].register_forward_hook(lambda m, a, out: ran.append(1))
        outer = module.register_forward_hook(lambda m, a, out: returned.append(out))
        handle = apply_cache_schedule(pipe, CacheMaskConfig.from_array(info.components, mask))
        try:
            pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)})
        finally:
            handle.remove()
            hook.remove()
            outer.remove()
        # steps 0 and 2 compute (2 calls each); steps 1 and 3 reuse: call k of step 1 returns (the cache's
        # copy of) call k of step 0, never call 1-k's
        assert len(ran) == 4 and len(returned) == 8
        for reused, computed in ((2, 0), (3, 1), (6, 4), (7, 5)):
            assert torch.equal(returned[reused], returned[computed])
            assert not torch.equal(returned[reused], returned[computed ^ 1])


@pytest.mark.parametrize("family", ["pixart", "sd", "sd3"])
def test_masks_run_on_other_families(family):
    with torch_threads(1):
        pipe, kwargs = build(family)
        info = difftune.describe(pipe)
        steps = kwargs["num_inference_steps"]
        base = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
        ones = CacheMaskConfig.from_array(info.components, np.ones(info.mask_shape(steps)))
        handle = apply_cache_schedule(pipe, ones)
        same = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
        handle.remove()
        np.testing.assert_array_equal(same, base)
        mask = np.ones(info.mask_shape(steps), dtype=bool)
        mask[1:] = False
        handle = apply_cache_schedule(pipe, CacheMaskConfig.from_array(info.components, mask))
        reduced = count_flops(lambda: pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}))
        handle.remove()
        full = count_flops(lambda: pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}))
        assert reduced < full


def test_component_flops_predict_the_counted_flops_of_a_schedule(monkeypatch, embedded_pipe):
    import difftune.accel.cache as cache_module

    info = difftune.describe(embedded_pipe)
    # 8 labels, 16 rows, 5 distinct labels: the gate stack's distinct-row way can give the blocks' bits
    labels = [1, 4, 7, 1, 4, 7, 2, 2]
    flops = component_flops(embedded_pipe, lambda: _run(embedded_pipe, class_labels=labels))
    assert flops.per_component.shape == (len(info.blocks), len(info.components))
    assert (flops.per_component > 0).all() and flops.per_component.sum() < flops.total
    mask = _mask(info, every=3)
    mask[:, 0] = True  # keep block 0 always fresh: a non-uniform mask
    full = count_flops(lambda: _run(embedded_pipe, class_labels=labels))
    assert full == flops.total * STEPS
    config = CacheMaskConfig.from_array(info.components, mask)

    # Through the per-component hooks a schedule costs exactly what the FLOP model predicts.
    with monkeypatch.context() as patch:
        patch.setattr(cache_module, "fast_path_for", lambda *a: None)
        handle = apply_cache_schedule(embedded_pipe, config)
        counted = count_flops(lambda: _run(embedded_pipe, class_labels=labels))
        handle.remove()
    assert counted == flops.schedule_flops(mask)
    assert flops.ideal_speedup(mask) == pytest.approx(full / counted)

    # A fully reused block computes only its gates. Where two or more blocks are fully reused at a step,
    # the first computes every one's at once (the gate stack) on the first run, and keeps them per
    # timestep value and labels: the second run (counted) computes none of them. A lone reused block,
    # or a BLAS whose smaller products round differently, computes its own two gate chunks (where that
    # gives the same bits). Both ways are checked on the first run.
    shared = []
    monkeypatch.setattr(cache_module, "Shared", lambda *a: shared.append(Shared(*a)) or shared[-1])
    handle = apply_cache_schedule(embedded_pipe, config)
    _run(embedded_pipe, class_labels=labels)
    fast = count_flops(lambda: _run(embedded_pipe, class_labels=labels))
    handle.remove()
    (state,) = shared
    verdicts, ways = state._same_bits, list(state.stack._same.values())
    rows, width = 2 * len(labels), embedded_pipe.transformer.inner_dim  # doubled for guidance
    timestep_mlp = rows * (256 * width + width * width) * 2
    modulation = rows * 6 * width * width * 2
    gates_only = rows * 4 * width * width * 2 if all(verdicts.values()) else 0
    saved = 0
    for step in range(STEPS):
        group = int((~mask[step]).all(axis=1).sum())  # blocks fully reused at this step
        saved += group * (timestep_mlp + modulation if group >= 2 and ways and all(ways) else gates_only)
    assert ways == ["distinct"], "no step reused two blocks, or the stack did not give the blocks' bits"
    assert fast == flops.schedule_flops(mask) - saved


def test_configs_round_trip_through_json(embedded_pipe):
    info = difftune.describe(embedded_pipe)
    mask = CacheMaskConfig.from_array(info.components, _mask(info))
    for config in (mask, FORAConfig(interval=3)):
        data = json.loads(json.dumps(config.to_dict()))
        again = CacheMaskConfig.from_dict(data) if data["kind"] == "mask" else CachePolicy.from_dict(data)
        assert again == config


@pytest.mark.parametrize(
    "data,message",
    [
        ({"kind": "mask", "components": ["attn1", "ff"], "mask": [[[1, 2]]]}, r"cache.mask\[0\]\[0\]"),
        ({"kind": "mask", "components": [], "mask": [[[1]]]}, "cache.components"),
        ({"kind": "mask", "components": ["a"], "mask": [[[1], [1]], [[1]]]}, r"cache.mask\[1\]: has 1 blocks"),
        ({"kind": "policy", "policy": "nope"}, "known policies: .*fora"),
        ({"kind": "policy", "policy": "fora", "interval": 0}, "cache.interval: must be >= 1"),
        ({"kind": "policy", "policy": "fora", "intervl": 2}, "unknown key"),
    ],
)
def test_malformed_cache_sections_name_the_field(data, message):
    cls = CacheMaskConfig if data["kind"] == "mask" else CachePolicy
    with pytest.raises(difftune.ProfileError, match=message):
        cls.from_dict(data)


def test_a_mask_resampled_to_another_step_count_keeps_its_pattern_in_time():
    from difftune.accel.cache import CacheMaskConfig

    # 5 steps × 1 block × 2 components: computes at 0, 2, 4; component 1 also at 3
    rows = [[[1, 1]], [[0, 0]], [[1, 1]], [[0, 1]], [[1, 1]]]
    mask = CacheMaskConfig.from_array(("attn1", "ff"), rows)
    # to 9 steps: step i takes old step ⌊i·4/8 + ½⌋ = 0 1 1 2 2 3 3 4 4 (ties to the later step)
    nine = mask.resample(9).array[:, 0, :].astype(int).tolist()
    assert nine == [[1, 1], [0, 0], [0, 0], [1, 1], [1, 1], [0, 1], [0, 1], [1, 1], [1, 1]]
    # to 3 steps: 0 2 4; step 0 always computes
    assert mask.resample(3).array[:, 0, :].astype(int).tolist() == [[1, 1], [1, 1], [1, 1]]
    assert mask.resample(2).array[:, 0, :].astype(int).tolist() == [[1, 1], [1, 1]]
    assert mask.resample(5) is mask
    reused_first = CacheMaskConfig.from_array(("attn1", "ff"), [[[0, 0]], [[0, 0]]])
    assert reused_first.resample(4).array[0].all()  # nothing is cached before step 0
    with pytest.raises(difftune.ProfileError, match="resample"):
        mask.resample(0)
