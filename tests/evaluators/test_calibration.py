"""Calibration sets: disjoint seeds, seed-major order, reproducible call kwargs, prompt files."""

from __future__ import annotations

import pytest
import torch

import difftune
from difftune.evaluators import (
    BUILTIN_PROMPTS,
    SEED_RANGES,
    CalibrationSet,
    Sample,
    batch_kwargs,
    read_prompt_file,
)


def test_calibration_and_held_out_seeds_are_disjoint():
    cal = CalibrationSet(labels=range(10), seeds=50)
    held = CalibrationSet(labels=range(10), seeds=50, split="held_out")
    assert not {s.seed for s in cal} & {s.seed for s in held}
    assert all(s.seed in SEED_RANGES["calibration"] for s in cal)
    assert all(s.seed in SEED_RANGES["held_out"] for s in held)
    with pytest.raises(difftune.EvaluationError, match="outside the calibration range"):
        CalibrationSet(labels=[1], seeds=[3, SEED_RANGES["held_out"].start])
    with pytest.raises(difftune.EvaluationError, match="split"):
        CalibrationSet(labels=[1], split="test")


def test_samples_are_seed_major_so_prefixes_cover_the_conditions():
    cal = CalibrationSet(labels=range(10), seeds=3)
    assert len(cal) == 30
    assert [s.condition for s in cal[:10]] == list(range(10))
    assert {s.seed for s in cal[:10]} == {0}
    assert cal[10] == Sample(0, 1)
    assert len({s.key for s in cal}) == 30


def test_batch_kwargs_are_reproducible_per_sample():
    cal = CalibrationSet(labels=[3, 7], seeds=2)
    kw = batch_kwargs(cal[:2])
    assert kw["class_labels"] == [3, 7] and len(kw["generator"]) == 2
    again = batch_kwargs(cal[:2])
    for g1, g2 in zip(kw["generator"], again["generator"], strict=True):
        assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    # a sample's noise does not depend on the batch it is in
    alone = batch_kwargs([cal[1]])["generator"][0]
    assert torch.equal(torch.randn(4, generator=alone), torch.randn(4, generator=batch_kwargs(cal[:2])["generator"][1]))
    text = batch_kwargs(CalibrationSet(prompts=["a cat", "a dog"], seeds=1)[:2])
    assert text["prompt"] == ["a cat", "a dog"] and "class_labels" not in text
    with pytest.raises(difftune.EvaluationError, match="mixes"):
        batch_kwargs([Sample(1, 0), Sample("a cat", 0)])


def test_generated_images_are_reproducible(embedded_pipe):
    from difftune.evaluators import generate

    cal = CalibrationSet(labels=[2, 5], seeds=2)
    a = generate(embedded_pipe, cal[:3], {"num_inference_steps": 3})
    b = generate(embedded_pipe, cal[:3], {"num_inference_steps": 3})
    assert a.shape == (3, 1, 16, 16) and a.dtype == torch.float32 and torch.equal(a, b)
    with pytest.raises(difftune.EvaluationError, match="per sample"):
        generate(embedded_pipe, cal[:1], {"generator": None})


def test_builtin_prompts_and_default_sets(embedded_pipe):
    assert 12 <= len(BUILTIN_PROMPTS) <= 20 and len(set(BUILTIN_PROMPTS)) == len(BUILTIN_PROMPTS)
    cal = CalibrationSet.for_pipeline(embedded_pipe, seeds=2)
    assert cal.conditions == tuple(range(10)) and len(cal) == 20


def test_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na red bicycle\n\n  a blue whale  \n# done\n", encoding="utf-8")
    assert read_prompt_file(path) == ["a red bicycle", "a blue whale"]
    cal = CalibrationSet.from_prompt_file(path, seeds=2, split="held_out")
    assert len(cal) == 4 and cal[0] == Sample("a red bicycle", SEED_RANGES["held_out"].start)
    (tmp_path / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(difftune.EvaluationError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(difftune.EvaluationError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(difftune.EvaluationError, match="not UTF-8"):
        read_prompt_file(tmp_path / "latin1.txt")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one"),
        ({"labels": [1], "prompts": ["a"]}, "exactly one"),
        ({"prompts": "a cat"}, "list of prompts"),
        ({"prompts": ["a", " "]}, "empty"),
        ({"labels": [1.5]}, "integer"),
        ({"labels": [-1]}, "negative"),
        ({"labels": [1], "seeds": 0}, "count"),
        ({"labels": [1], "seeds": [1, 1]}, "duplicates"),
    ],
)
def test_bad_sets_are_refused(kwargs, match):
    with pytest.raises(difftune.EvaluationError, match=match):
        CalibrationSet(**kwargs)
