"""The reused-block fast path of cache schedules: bit-identical to the per-component hooks.

Every test runs a schedule twice, once as applied and once with the fast path switched off (every block
runs with its components hooked, as before the fast path existed), and compares every denoiser output
of the run with ``torch.equal``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import pytest
import torch

import difftune
from difftune.accel import cache as cache_module
from difftune.accel._hooks import wrap_forward
from difftune.accel.cache import CacheMaskConfig, FORAConfig, apply_cache_schedule
from tests.models.tiny_pipelines import build, torch_threads

STEPS = 4


@contextmanager
def hook_path_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Schedules applied inside run every block through its component hooks (no fast path)."""
    with monkeypatch.context() as patch:
        patch.setattr(cache_module, "fast_path_for", lambda *args: None)
        yield


def random_mask(info: Any, steps: int, seed: int) -> np.ndarray:
    """Random bits with step 0 computing everything, step 1 reusing everything, and at every later
    step some blocks reusing all their components next to blocks recomputing all of theirs."""
    rng = np.random.default_rng(seed)
    mask = rng.random(info.mask_shape(steps)) < 0.5
    mask[0] = True
    mask[1] = False
    blocks = len(info.blocks)
    for step in range(2, steps):
        order = rng.permutation(blocks)
        mask[step, order[: max(1, blocks // 3)]] = False
        mask[step, order[max(1, blocks // 3) : max(2, 2 * blocks // 3)]] = True
    return mask


def fully_reused_cells(info: Any, mask: np.ndarray) -> int:
    """Component-module calls the fast path saves per denoiser call: for every (step, block) whose present
    components are all reused, the number of component modules of that block."""
    saved = 0
    for b, block in enumerate(info.block_info):
        present = [k for k, paths in enumerate(block.components) if paths]
        modules = sum(len(block.components[k]) for k in present)
        saved += modules * int((~mask[:, b, present]).all(axis=1).sum())
    return saved


@contextmanager
def recorded(pipe: Any, info: Any) -> Iterator[dict[str, list[Any]]]:
    """Every denoiser output of the run, and how often component modules were entered."""
    record: dict[str, list[Any]] = {"outputs": [], "component_calls": []}
    denoiser = getattr(pipe, info.denoiser)

    def keep(module: Any, args: Any, output: Any) -> None:
        record["outputs"].append(output[0] if isinstance(output, tuple) else output.sample)

    handles = [denoiser.register_forward_hook(keep)]
    for block in info.block_info:
        for paths in block.components:
            for path in paths:
                module = denoiser.get_submodule(path)
                handles.append(module.register_forward_pre_hook(lambda *a: record["component_calls"].append(1)))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def assert_same_outputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and a
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"denoiser call {i} differs: max |Δ| = {(x - y).abs().max().item()}"


def no_wrappers_left(pipe: Any, info: Any) -> None:
    for module in getattr(pipe, info.denoiser).modules():
        assert "forward" not in module.__dict__
    assert "set_timesteps" not in pipe.scheduler.__dict__


def compare_paths(
    monkeypatch: pytest.MonkeyPatch, pipe: Any, info: Any, config: Any, run: Callable[[], Any]
) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Run ``config`` with the fast path and on the hook path; return both records."""
    with recorded(pipe, info) as fast:
        handle = apply_cache_schedule(pipe, config)
        run()
        handle.remove()
    with hook_path_only(monkeypatch), recorded(pipe, info) as hooks:
        handle = apply_cache_schedule(pipe, config)
        run()
        handle.remove()
    assert_same_outputs(fast["outputs"], hooks["outputs"])
    return fast, hooks


def _run_embedded(pipe: Any, steps: int = 8) -> Any:
    # guidance_scale 1.5 (the default) runs the conditional and unconditional halves as one batch
    return pipe(
        class_labels=[1, 4, 7],
        num_inference_steps=steps,
        guidance_scale=1.5,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_embedded_random_masks_are_bit_identical_to_the_hook_path(monkeypatch, embedded_pipe, seed):
    info = difftune.describe(embedded_pipe)
    steps = 8
    base = _run_embedded(embedded_pipe, steps)
    mask = random_mask(info, steps, seed)
    config = CacheMaskConfig.from_array(info.components, mask)
    fast, hooks = compare_paths(monkeypatch, embedded_pipe, info, config, lambda: _run_embedded(embedded_pipe, steps))
    # The fast path really ran: fully reused blocks never entered their attention or MLP.
    saved = fully_reused_cells(info, mask)
    assert saved > 0
    assert len(hooks["component_calls"]) - len(fast["component_calls"]) == saved
    assert torch.equal(_run_embedded(embedded_pipe, steps), base)
    no_wrappers_left(embedded_pipe, info)


def test_fora_uses_the_fast_path_and_matches_the_hooks(monkeypatch, embedded_pipe):
    info = difftune.describe(embedded_pipe)
    base = _run_embedded(embedded_pipe, 6)

    def run_fora() -> tuple[list[torch.Tensor], int]:
        with recorded(embedded_pipe, info) as record:
            handle = FORAConfig(interval=3).apply(embedded_pipe)
            _run_embedded(embedded_pipe, 6)
            handle.remove()
        return record["outputs"], len(record["component_calls"])

    fast, fast_calls = run_fora()
    with hook_path_only(monkeypatch):
        hooks, hook_calls = run_fora()
    assert_same_outputs(fast, hooks)
    # steps 1, 2, 4, 5 reuse every block: their components are never entered
    assert hook_calls - fast_calls == 4 * len(info.blocks) * len(info.components)
    assert torch.equal(_run_embedded(embedded_pipe, 6), base)


def _sd35(seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The tiny SD3 pipeline with an SD3.5-style transformer: a second image self-attention (``attn2``)
    in block 0, so the dual-attention gates of the joint block's fast path are checked too."""
    from diffusers import SD3Transformer2DModel

    pipe, kwargs = build("sd3", seed)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**{**config, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}).eval()
    pipe.register_modules(transformer=transformer)
    return pipe, kwargs


@pytest.mark.parametrize("family", ["dit", "pixart", "flux", "sd3", "sd3.5", "sd", "sdxl"])
def test_tiny_pipelines_random_masks_are_bit_identical_to_the_hook_path(monkeypatch, family):
    with torch_threads(1):
        pipe, kwargs = _sd35() if family == "sd3.5" else build(family)
        info = difftune.describe(pipe)
        if family == "sd3.5":
            assert info.block_info[0].components[0] == ("transformer_blocks.0.attn", "transformer_blocks.0.attn2")
        kwargs["num_inference_steps"] = STEPS
        kwargs["output_type"] = "np"

        def run() -> Any:
            return pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images

        with recorded(pipe, info) as plain:
            base = run()
        mask = random_mask(info, STEPS, seed=7)
        fast, hooks = compare_paths(monkeypatch, pipe, info, CacheMaskConfig.from_array(info.components, mask), run)
        calls_per_step = len(plain["outputs"]) // STEPS  # Flux's true CFG makes two denoiser calls a step
        saved = len(hooks["component_calls"]) - len(fast["component_calls"])
        if family in ("sd", "sdxl"):
            assert saved == 0  # UNet blocks keep the per-component hooks
        else:
            assert saved == calls_per_step * fully_reused_cells(info, mask) > 0
        np.testing.assert_array_equal(run(), base)
        no_wrappers_left(pipe, info)


def _dit_denoiser_calls(pipe: Any, batches: list[int]) -> list[torch.Tensor]:
    """Call the tiny DiT's denoiser directly, one call per step with decreasing timesteps, under
    gradient checkpointing (diffusers then passes the block arguments by position)."""
    torch.manual_seed(0)
    transformer = pipe.transformer
    outputs = []
    for step, batch in enumerate(batches):
        x = torch.randn(batch, 4, 16, 16)
        t = torch.full((batch,), 900.0 - 100 * step)
        labels = torch.arange(batch) % 1000
        outputs.append(transformer(x, timestep=t, class_labels=labels).sample)
    return outputs


def test_positional_block_arguments_and_batch_changes(monkeypatch):
    with torch_threads(1):
        pipe, _ = build("dit")
        info = difftune.describe(pipe)
        pipe.transformer.enable_gradient_checkpointing()
        mask = np.zeros(info.mask_shape(4), dtype=bool)
        mask[0] = True
        config = CacheMaskConfig.from_array(info.components, mask)
        # step 2 changes the batch: nothing cached matches, so it recomputes (and its output is what
        # step 3 reuses)
        batches = [2, 2, 3, 3]
        results, calls = [], []
        for patch in (False, True):
            with torch.enable_grad(), hook_path_only(monkeypatch) if patch else nullcontext():
                with recorded(pipe, info) as record:
                    handle = apply_cache_schedule(pipe, config)
                    results.append(_dit_denoiser_calls(pipe, batches))
                    handle.remove()
            calls.append(len(record["component_calls"]))
        assert_same_outputs(*results)
        # the fast path ran at steps 1 and 3 (positional arguments), not at step 2 (batch change)
        assert calls[1] - calls[0] == 2 * len(info.blocks) * len(info.components)


def test_a_block_wrapped_by_another_technique_keeps_running_its_wrapper(monkeypatch, embedded_pipe):
    """The fast path would bypass an earlier wrapper of the block: such blocks keep the hook path."""
    info = difftune.describe(embedded_pipe)
    block = embedded_pipe.transformer.get_submodule(info.blocks[1])
    entered: list[int] = []

    def outer(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        entered.append(1)
        return forward(*args, **kwargs)

    mask = np.zeros(info.mask_shape(6), dtype=bool)
    mask[0] = True
    config = CacheMaskConfig.from_array(info.components, mask)
    earlier = wrap_forward(block, outer)
    try:
        fast, _ = compare_paths(monkeypatch, embedded_pipe, info, config, lambda: _run_embedded(embedded_pipe, 6))
    finally:
        earlier.remove()
    assert len(entered) == 2 * 6  # both runs, every step
    # only block 1 still enters its components at the reused steps 1-5
    assert len(fast["component_calls"]) == len(info.blocks) * 2 + 5 * 2


def _counting(entered: list[int]) -> Callable[..., Any]:
    def wrapper(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        entered.append(1)
        return forward(*args, **kwargs)

    return wrapper


def test_wrappers_the_fast_path_would_bypass_keep_running(embedded_pipe):
    """A component re-wrapped after the schedule, or an adaLN norm wrapped before it, is still entered
    at every step: its block falls back to the hook path (the output then matches it as well)."""
    info = difftune.describe(embedded_pipe)
    transformer = embedded_pipe.transformer
    mask = np.zeros(info.mask_shape(6), dtype=bool)
    mask[0] = True
    config = CacheMaskConfig.from_array(info.components, mask)
    norm_calls: list[int] = []
    norm = wrap_forward(transformer.get_submodule(f"{info.blocks[0]}.norm1"), _counting(norm_calls))
    handle = apply_cache_schedule(embedded_pipe, config)
    component_calls: list[int] = []
    later = wrap_forward(transformer.get_submodule(f"{info.blocks[2]}.ff"), _counting(component_calls))
    try:
        _run_embedded(embedded_pipe, 6)
    finally:
        later.remove()
        handle.remove()
        norm.remove()
    assert len(norm_calls) == 6 and len(component_calls) == 6


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fast_path_is_bit_identical_to_the_hook_path_on_cuda(monkeypatch, dtype):
    pipe = difftune.load_pipeline("embedded", device="cuda", torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    info = difftune.describe(pipe)
    mask = random_mask(info, 8, seed=3)
    fast, hooks = compare_paths(
        monkeypatch, pipe, info, CacheMaskConfig.from_array(info.components, mask), lambda: _run_embedded(pipe, 8)
    )
    assert fast["outputs"][0].device.type == "cuda" and fast["outputs"][0].dtype == dtype
    assert len(hooks["component_calls"]) - len(fast["component_calls"]) == fully_reused_cells(info, mask)


def test_gate_chunks_are_the_whole_products_bits_or_the_whole_product(monkeypatch):
    from difftune.accel._reused_blocks import Shared

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 6 * 16)
    x = torch.randn(5, 32)
    whole = linear(x).chunk(6, dim=1)
    shared = Shared()
    first = shared.gates(linear, x, 6, (2, 5))  # the check's call hands back the whole product's chunks
    second = shared.gates(linear, x, 6, (2, 5))
    for got in (first, second):
        assert [torch.equal(g, whole[i]) for g, i in zip(got, (2, 5), strict=True)] == [True, True]
    (verdict,) = shared._same_bits.values()
    if verdict:  # where the BLAS gives the same bits, the second call computed only the gate rows
        assert second[0].is_contiguous() and not whole[2].is_contiguous()

    # A BLAS whose narrower product rounds differently: the check fails and the whole product is kept.
    real_linear = torch.nn.functional.linear

    def off_by_an_ulp(inp, weight, bias=None):
        out = real_linear(inp, weight, bias)
        return torch.nextafter(out, torch.full_like(out, float("inf"))) if weight.shape[0] == 16 else out

    monkeypatch.setattr(torch.nn.functional, "linear", off_by_an_ulp)
    wary = Shared()
    for _ in range(2):
        got = wary.gates(linear, x, 6, (2, 5))
        assert torch.equal(got[0], whole[2]) and torch.equal(got[1], whole[5])
    assert list(wary._same_bits.values()) == [False]
    # A linear another library replaced (a quantized weight, a LoRA layer) is always computed whole.
    assert Shared().gates(torch.nn.Identity(), x, 2, (1,))[0].shape == (5, 16)


def test_the_output_heads_conditioning_comes_from_the_first_blocks_reused_step(monkeypatch, embedded_pipe):
    """DiT's output head calls block 0's label-and-timestep embedding again with the block's own inputs:
    with a fast path on block 0 it is computed once per denoiser call, with the same images."""
    info = difftune.describe(embedded_pipe)
    embedder = embedded_pipe.transformer.transformer_blocks[0].norm1.emb.timestep_embedder
    calls: list[int] = []
    hook = embedder.register_forward_hook(lambda *a: calls.append(1))
    try:
        base = _run_embedded(embedded_pipe, 6)
        plain_calls = len(calls)
        mask = np.ones(info.mask_shape(6), dtype=bool)
        mask[1:] = False
        calls.clear()
        handle = apply_cache_schedule(embedded_pipe, CacheMaskConfig.from_array(info.components, mask))
        # the memo sits on the embedding the head calls again, block 0's, and nowhere else
        blocks = embedded_pipe.transformer.transformer_blocks
        assert ["forward" in block.norm1.emb.__dict__ for block in blocks] == [True] + [False] * (len(blocks) - 1)
        fast = _run_embedded(embedded_pipe, 6)
        fast_calls = len(calls)
        handle.remove()
        with hook_path_only(monkeypatch):
            handle = apply_cache_schedule(embedded_pipe, CacheMaskConfig.from_array(info.components, mask))
            hooks = _run_embedded(embedded_pipe, 6)
            handle.remove()
    finally:
        hook.remove()
    assert plain_calls == 2 * 6  # the block and the head, every step
    assert fast_calls == 6
    assert torch.equal(fast, hooks)
    assert not torch.equal(fast, base)
    no_wrappers_left(embedded_pipe, info)


def test_the_conditioning_memo_recomputes_for_new_or_modified_inputs(embedded_pipe):
    from difftune.accel._reused_blocks import BasicBlockFastPath, Shared

    block = embedded_pipe.transformer.transformer_blocks[0]
    fast = BasicBlockFastPath(block, Shared())
    t = torch.full((4,), 500.0)
    labels = torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        first = fast.conditioning(t, labels, torch.float32)
        assert fast.conditioning(t, labels, torch.float32) is first
        reference = block.norm1.emb(t, labels, hidden_dtype=torch.float32)
        assert torch.equal(first, reference)
        labels[0] = 7  # modified in place: the same object, another version
        changed = fast.conditioning(t, labels, torch.float32)
        assert changed is not first
        assert torch.equal(changed, block.norm1.emb(t, labels, hidden_dtype=torch.float32))
        assert fast.conditioning(t.clone(), labels, torch.float32) is not changed


@contextmanager
def counted_baddbmm(monkeypatch: pytest.MonkeyPatch, nudge: bool = False) -> Iterator[list[int]]:
    """Counts ``torch.baddbmm`` calls (the gate stack's batched products); ``nudge`` makes each result one
    ulp larger, as a BLAS whose batched kernels sum in another order would."""
    calls: list[int] = []
    real = torch.baddbmm

    def baddbmm(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        out = real(*args, **kwargs)
        return torch.nextafter(out, torch.full_like(out, float("inf"))) if nudge else out

    with monkeypatch.context() as patch:
        patch.setattr(torch, "baddbmm", baddbmm)
        yield calls


def _stack_of(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The Shared state of every schedule applied from now on (its ``stack`` holds the verdicts)."""
    from difftune.accel._reused_blocks import Shared

    made: list[Any] = []
    monkeypatch.setattr(cache_module, "Shared", lambda *a: made.append(Shared(*a)) or made[-1])
    return made


_STACKED_LABELS = (1, 4, 7, 1, 4, 7, 2, 2)


def _run_stacked(pipe: Any, steps: int, labels: Sequence[int] = _STACKED_LABELS) -> Any:
    """16 rows (8 labels doubled for guidance), 5 distinct labels: the gate stack's distinct-row way runs
    on 8 of them. (With 6 rows, as in ``_run_embedded``, MKL's 6-row products sum in another order than
    any batched product, and the blocks keep their own gates.)"""
    return pipe(
        class_labels=list(labels),
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def _hook_path_images(
    monkeypatch: pytest.MonkeyPatch, pipe: Any, config: Any, steps: int, labels: Sequence[int] = _STACKED_LABELS
) -> torch.Tensor:
    with hook_path_only(monkeypatch):
        handle = apply_cache_schedule(pipe, config)
        images = _run_stacked(pipe, steps, labels)
        handle.remove()
    return images


def test_the_gate_stack_computes_every_reused_blocks_gates_in_three_batched_products(monkeypatch, embedded_pipe):
    """At a step reusing all six blocks, the first computes every block's gates: the timestep MLP (two
    products, then kept per timestep value) and the gate chunks (one product, then kept per timestep value
    and labels) for all blocks at once, bit-identical to the blocks computing their own."""
    info = difftune.describe(embedded_pipe)
    mask = np.ones(info.mask_shape(6), dtype=bool)
    mask[1:] = False  # steps 1-5 reuse every block
    config = CacheMaskConfig.from_array(info.components, mask)
    other_labels = (3, 3, 0, 9, 9, 0, 5, 5)
    reference = _hook_path_images(monkeypatch, embedded_pipe, config, 6)
    other_reference = _hook_path_images(monkeypatch, embedded_pipe, config, 6, other_labels)
    made = _stack_of(monkeypatch)
    handle = apply_cache_schedule(embedded_pipe, config)
    try:
        with counted_baddbmm(monkeypatch) as calls:
            first = _run_stacked(embedded_pipe, 6)
            counts = [len(calls)]
            second = _run_stacked(embedded_pipe, 6)
            counts.append(len(calls) - sum(counts))
            other = _run_stacked(embedded_pipe, 6, other_labels)
            counts.append(len(calls) - sum(counts))
            again = _run_stacked(embedded_pipe, 6)
            counts.append(len(calls) - sum(counts))
    finally:
        handle.remove()
    (shared,) = made
    assert len(shared.stack.members) == 6
    (way,) = shared.stack._same.values()
    assert torch.equal(first, reference) and torch.equal(second, reference) and torch.equal(again, reference)
    assert torch.equal(other, other_reference) and not torch.equal(other, reference)
    assert way == "distinct", "MKL's batched products should give the blocks' bits on 4, 8 or 16 rows"
    # first run: 3 products at each of the 5 reused steps (step 1's are then checked against the blocks'
    # own); the same labels again: every step's gates kept; other labels: the timestep MLP's outputs are
    # kept per timestep value, 1 product a step; the first labels once more: kept
    assert counts == [15, 0, 5, 0]
    no_wrappers_left(embedded_pipe, info)


def test_gates_kept_across_runs_are_computed_again_once_modified():
    """A kept result modified in place (by code holding a gate) is not handed out again."""
    from difftune.accel._reused_blocks import Shared

    stack = Shared().stack
    # the stacked copies' shapes for 2 blocks, width 4, 4 labels: only the table and gate weights are read
    weights = (*(torch.randn(2, 4, 4) for _ in range(5)), torch.randn(2, 4, 8), torch.randn(2, 1, 8))
    computed: list[int] = []
    real = torch.baddbmm

    def count(*args: Any, **kwargs: Any) -> torch.Tensor:
        computed.append(1)
        return real(*args, **kwargs)

    stack._timestep_mlp = lambda group, w, times, dtype, rows: torch.zeros(2, len(times), 4)  # type: ignore[method-assign]
    t, labels = torch.full((4,), 10.0), torch.tensor([0, 1, 2, 3])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "baddbmm", count)
        emb, gates = stack._compute([None, None], weights, t, labels, torch.float32, False)
        again = stack._compute([None, None], weights, t, labels.clone(), torch.float32, False)
        assert again[0] is emb and len(computed) == 1  # same values, another tensor: kept
        gates[1][0].mul_(2.0)
        fresh = stack._compute([None, None], weights, t, labels, torch.float32, False)
        assert fresh[0] is not emb and len(computed) == 2
        assert torch.equal(fresh[1][1][0], gates[1][0] / 2.0)
        stack._compute([None, None], weights, torch.full((4,), 9.0), labels, torch.float32, False)
        assert len(computed) == 3  # another timestep value


def test_the_gate_stack_gives_way_where_batched_products_round_differently(monkeypatch, embedded_pipe):
    info = difftune.describe(embedded_pipe)
    mask = random_mask(info, 8, seed=5)
    config = CacheMaskConfig.from_array(info.components, mask)
    reference = _hook_path_images(monkeypatch, embedded_pipe, config, 8)
    made = _stack_of(monkeypatch)
    handle = apply_cache_schedule(embedded_pipe, config)
    try:
        with counted_baddbmm(monkeypatch, nudge=True) as calls:
            images = [_run_stacked(embedded_pipe, 8) for _ in range(2)]
    finally:
        handle.remove()
    (shared,) = made
    assert shared.stack._same and not any(shared.stack._same.values())
    assert all(torch.equal(x, reference) for x in images)
    # the check's products only, both ways, for each group of blocks reused together (then never again)
    assert len(calls) == 6 * len(shared.stack._same)


def test_the_gate_stack_follows_weights_changed_between_runs(monkeypatch, embedded_pipe):
    info = difftune.describe(embedded_pipe)
    mask = np.ones(info.mask_shape(6), dtype=bool)
    mask[1:] = False
    config = CacheMaskConfig.from_array(info.components, mask)
    blocks = embedded_pipe.transformer.transformer_blocks
    modulation, table = blocks[3].norm1.linear.weight, blocks[2].norm1.emb.class_embedder.embedding_table.weight
    timestep_mlp = blocks[1].norm1.emb.timestep_embedder.linear_1
    weights = (modulation, table, timestep_mlp.weight)
    kept = [w.detach().clone() for w in weights]
    handle = apply_cache_schedule(embedded_pipe, config)
    try:
        before = _run_stacked(embedded_pipe, 6)
        with torch.no_grad():
            modulation.mul_(1.01)  # in place, as a LoRA fuse would (a new version)
        table.data[1].add_(0.1)  # through .data: neither storage nor version changes
        after = _run_stacked(embedded_pipe, 6)
        # a run out of the stack (a hook on a timestep MLP), a weight change, the hook gone: restacked, and
        # no timestep-MLP output kept from the old copies
        hook = timestep_mlp.register_forward_hook(lambda *a: None)
        hooked = _run_stacked(embedded_pipe, 6)
        hook.remove()
        timestep_mlp.weight.data.mul_(0.99)
        last = _run_stacked(embedded_pipe, 6)
        handle.remove()
        assert torch.equal(last, _hook_path_images(monkeypatch, embedded_pipe, config, 6))
        with torch.no_grad():
            timestep_mlp.weight.copy_(kept[2])
        assert torch.equal(after, _hook_path_images(monkeypatch, embedded_pipe, config, 6))
        assert torch.equal(hooked, after)
        assert not torch.equal(after, before) and not torch.equal(last, after)
    finally:
        handle.remove()
        with torch.no_grad():
            for weight, value in zip(weights, kept, strict=True):
                weight.copy_(value)


def test_the_gate_stack_sees_a_weight_edited_through_data(monkeypatch, embedded_pipe):
    """An edit through ``.data`` changes neither the weight's storage nor its version: the stacked copies
    are compared with the weights' values at the start of every run."""
    info = difftune.describe(embedded_pipe)
    mask = np.ones(info.mask_shape(6), dtype=bool)
    mask[1:] = False
    config = CacheMaskConfig.from_array(info.components, mask)
    bias = embedded_pipe.transformer.transformer_blocks[5].norm1.linear.bias
    kept = bias.detach().clone()
    made = _stack_of(monkeypatch)
    handle = apply_cache_schedule(embedded_pipe, config)
    try:
        before = _run_stacked(embedded_pipe, 6)
        (shared,) = made
        (entry,) = shared.stack._weights.values()
        version = bias._version
        bias.data[2 * 128 : 3 * 128].add_(0.05)  # gate_msa's bias rows
        assert bias._version == version
        after = _run_stacked(embedded_pipe, 6)
        assert next(iter(shared.stack._weights.values())) is not entry  # restacked
        handle.remove()
        assert torch.equal(after, _hook_path_images(monkeypatch, embedded_pipe, config, 6))
        assert not torch.equal(after, before)
    finally:
        handle.remove()
        bias.data.copy_(kept)


def test_the_value_check_compares_bits_not_values():
    """The per-run check tells -0.0 from 0.0 (a gate product's zero can take either sign) and takes a NaN
    weight as unchanged (a value comparison would restack such a model at every run)."""
    from difftune.accel._reused_blocks import _Values

    torch.manual_seed(0)
    width = 4
    row = [torch.randn(8, 16), torch.randn(8), torch.randn(4, 8), torch.randn(4), torch.randn(3, 4)]
    row += [torch.randn(6 * width, 4), torch.randn(6 * width)]
    row[1][0] = 0.0
    row[0][0, 0] = float("nan")
    values = _Values([tuple(row)], width)
    assert values.holds_values()  # the NaN equals itself, bit for bit
    row[1].data[0] = -0.0  # equal as a value, another bit pattern
    assert not values.holds_values()
    row[1].data[0] = 0.0
    assert values.holds_values()
    row[5].data[2 * width, 1] += 1.0  # a gate row of the modulation weight
    assert not values.holds_values()


def _hooked(path: str):
    return lambda block: block.get_submodule(path).register_forward_hook(lambda *a: None)


def _wrapped(path: str):
    return lambda block: wrap_forward(block.get_submodule(path), lambda inner, *a, **k: inner(*a, **k))


def _set(path: str, name: str, value: Any):
    return lambda block: setattr(block.get_submodule(path), name, value)


@pytest.mark.parametrize(
    "change",
    [
        *(
            _hooked(path)
            for path in (
                "norm1",
                "norm1.emb",
                "norm1.emb.time_proj",
                "norm1.emb.timestep_embedder",
                "norm1.emb.timestep_embedder.linear_1",
                "norm1.emb.timestep_embedder.act",
                "norm1.emb.timestep_embedder.linear_2",
                "norm1.emb.class_embedder",
                "norm1.emb.class_embedder.embedding_table",
                "norm1.linear",
                "norm1.silu",
            )
        ),
        _wrapped("norm1.emb"),
        _wrapped("norm1.emb.time_proj"),
        _wrapped("norm1.emb.timestep_embedder.linear_1"),
        _wrapped("norm1.emb.class_embedder.embedding_table"),
        _wrapped("norm1.silu"),
        _set("norm1.emb.timestep_embedder", "cond_proj", torch.nn.Linear(4, 4)),
        _set("norm1.emb.timestep_embedder", "post_act", torch.nn.SiLU()),
        _set("norm1.emb.timestep_embedder", "act", torch.nn.GELU()),
        _set("norm1.emb.timestep_embedder.linear_2", "bias", None),
        _set("norm1", "emb", torch.nn.Identity()),
        lambda block: block.norm1.emb.class_embedder.train(),  # label dropout (0.1 in DiT) while training
    ],
)
def test_the_stack_takes_only_diffusers_own_unhooked_conditioning(embedded_pipe, change):
    """Every change the per-run check looks for keeps the block out of the stack: a hook or a foreign
    wrapper on any module it would compute without entering, a conditioning projection or post-activation,
    another activation, a missing bias, another embedding, label dropout in training."""
    from difftune.accel._reused_blocks import BasicBlockFastPath, Shared, _sources

    block = copy.deepcopy(embedded_pipe.transformer.transformer_blocks[0])
    block.norm1.emb.class_embedder.dropout_prob = 0.1
    fast = BasicBlockFastPath(block, Shared())
    fast.install()  # the fast path's own memo on the embedding is allowed
    before = _sources(fast)
    assert before is not None and before[0] is block.norm1.emb.timestep_embedder.linear_1.weight
    change(block)
    assert _sources(fast) is None


def test_a_non_contiguous_weight_keeps_the_blocks_out_of_the_stack(monkeypatch, embedded_pipe):
    """The per-run value check reads the weights through flat views, which a non-contiguous weight has
    not: such blocks compute their own gates."""
    info = difftune.describe(embedded_pipe)
    mask = np.ones(info.mask_shape(6), dtype=bool)
    mask[1:] = False
    config = CacheMaskConfig.from_array(info.components, mask)
    linear = embedded_pipe.transformer.transformer_blocks[2].norm1.linear
    kept = linear.weight
    linear.weight = torch.nn.Parameter(kept.detach().t().contiguous().t())  # same values, transposed layout
    try:
        assert not linear.weight.is_contiguous() and torch.equal(linear.weight, kept)
        reference = _hook_path_images(monkeypatch, embedded_pipe, config, 6)
        made = _stack_of(monkeypatch)
        handle = apply_cache_schedule(embedded_pipe, config)
        with counted_baddbmm(monkeypatch) as calls:
            images = _run_stacked(embedded_pipe, 6)
        handle.remove()
    finally:
        linear.weight = kept
    (shared,) = made
    assert [stacked for _, stacked, _ in shared.stack._weights.values()] == [None]
    assert not calls and torch.equal(images, reference)


def test_a_hook_on_a_blocks_modulation_keeps_that_step_out_of_the_stack(monkeypatch, embedded_pipe):
    """A torch hook registered on a block's modulation linear after the schedule was applied still fires at
    every step the block is reused (the stack would compute the product without entering the module)."""
    info = difftune.describe(embedded_pipe)
    mask = np.ones(info.mask_shape(6), dtype=bool)
    mask[1:] = False
    config = CacheMaskConfig.from_array(info.components, mask)
    reference = _hook_path_images(monkeypatch, embedded_pipe, config, 6)
    handle = apply_cache_schedule(embedded_pipe, config)
    _run_stacked(embedded_pipe, 6)  # the stack checked and in use
    fired: list[int] = []
    hook = embedded_pipe.transformer.transformer_blocks[4].norm1.linear.register_forward_hook(
        lambda *a: fired.append(1)
    )
    try:
        images = _run_stacked(embedded_pipe, 6)
    finally:
        hook.remove()
        handle.remove()
    assert len(fired) == 6  # the computed step 0 and the five reused steps
    assert torch.equal(images, reference)


def test_the_gate_stack_takes_distinct_rows_only_where_they_repeat():
    from difftune.accel._reused_blocks import Shared

    stack = Shared().stack
    t = torch.full((8,), 500.0)
    labels = torch.tensor([3, 1, 3, 1, 10, 10, 10, 10])  # 3 distinct: padded to 4 rows
    times, distinct, index = stack._distinct(t, labels)
    assert times.shape == (4,) and bool((times == 500.0).all())
    assert distinct.tolist() == [1, 3, 10, 10] and torch.equal(distinct[index], labels)
    mixed = t.clone()
    mixed[5] = 400.0
    assert stack._distinct(mixed, labels) is None  # not one timestep
    assert stack._distinct(t, torch.arange(8)) is None  # no repeats (8 distinct)
    assert stack._distinct(t[:6], torch.tensor([0, 1, 2, 3, 4, 4])) is None  # 5 distinct, padded to 8 > 6
    assert stack._distinct(t[:4], torch.tensor([1, 1, 1, 1])) is None  # 4 rows: nothing to save
    with torch.enable_grad():
        assert stack.gates(object(), t, labels, torch.float32) is None  # no tracker, no stack
