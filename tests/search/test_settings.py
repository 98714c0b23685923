"""StudySettings: devices, dtypes, prompt files, the call's options, samples — and the worker's device rule."""

from __future__ import annotations

import json

import pytest
import torch

from difftune.errors import DifftuneError, ModelError
from difftune.search.runner import worker_device
from difftune.search.settings import (
    StudySettings,
    device_type,
    merge_objectives,
    parse_dtype,
    read_prompts,
    resolve_device,
)

NO_CUDA = not torch.cuda.is_available()


def test_resolve_device_defaults_to_cuda_when_present_else_cpu():
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cpu:1", "tpu", "cuda:-1"])
def test_resolve_device_refuses_malformed_devices(bad):
    with pytest.raises(ModelError, match="expected cpu, cuda, cuda:N or mps"):
        resolve_device(bad)


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"], ids=["plain", "index-0", "index-3"])
def test_a_device_the_machine_lacks_is_an_error_never_a_cpu_run(device):
    with pytest.raises(ModelError, match="no usable CUDA device"):
        resolve_device(device)


@pytest.mark.cuda
def test_a_cuda_index_past_the_last_device_is_an_error():
    with pytest.raises(ModelError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_the_pipelines_own_device_is_the_default(embedded_pipe):
    class OnMeta:
        device = torch.device("meta")

    assert resolve_device(None, OnMeta()) == "meta"  # not the CPU: the pipeline's own device wins
    assert resolve_device(None, embedded_pipe) == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    "name,expected", [("fp16", "float16"), ("half", "float16"), ("bf16", "bfloat16"), ("torch.float32", "float32")]
)
def test_parse_dtype(name, expected):
    assert parse_dtype(name) == expected


def test_parse_dtype_refuses_unknown_names():
    with pytest.raises(ModelError, match="--dtype 'int8'"):
        parse_dtype("int8")


def test_read_prompts_lines_with_comments_and_json_lists(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("# my prompts\na red fox\n\n  a blue car  \n#skip\n", encoding="utf-8")
    assert read_prompts(lines) == ("a red fox", "a blue car")
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(["a cat", "a dog # not a comment in JSON"]), encoding="utf-8")
    assert read_prompts(listed) == ("a cat", "a dog # not a comment in JSON")


@pytest.mark.parametrize(
    "text,message",
    [
        ("[1, 2]", "non-empty list of non-empty strings"),
        ("[]", "non-empty list"),
        ('["a", ', "not valid JSON"),
        ("# only a comment\n\n", "holds no prompts"),
    ],
)
def test_read_prompts_refuses_bad_files(tmp_path, text, message):
    path = tmp_path / "p.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DifftuneError, match=message):
        read_prompts(path)
    with pytest.raises(DifftuneError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_settings_round_trip_through_json_and_old_studies_get_defaults():
    settings = StudySettings(
        model="/models/sdxl",
        device="cuda:1",
        dtype="fp16",
        prompts=("a", "b"),
        negative_prompt="blurry",
        height=512,
        width=768,
        guidance_scale=5,
        num_inference_steps=30,
        samples=8,
        metrics=("speedup", "psnr"),
        constraints=("lpips<=0.1",),
        nfe_range=(4, 10),
    )
    again = StudySettings.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert again == settings and again.dtype == "float16" and again.guidance_scale == 5.0
    # a study stored before these settings existed (PR #4's keys only)
    old = StudySettings.from_dict(
        {"model": "embedded", "num_inference_steps": 6, "samples": 4, "metrics": ["psnr"], "latency_repeats": 3}
    )
    assert old.device is None and device_type(old.device) == "cpu" and old.prompts is None and old.nfe_range == (3, 12)


def test_differences_name_what_changed_and_ignore_the_device_index():
    a = StudySettings(device="cuda:0", guidance_scale=4.5)
    assert a.differences(StudySettings(device="cuda:1", guidance_scale=4.5)) == {}
    assert set(a.differences(StudySettings(device="cpu", guidance_scale=7.0))) == {"device", "guidance_scale"}


def test_call_kwargs_are_checked_against_the_pipeline(embedded_pipe):
    assert StudySettings(guidance_scale=2.0).call_kwargs(embedded_pipe) == {"guidance_scale": 2.0}
    assert StudySettings(height=32, width=32).call_kwargs(embedded_pipe) == {"height": 32, "width": 32}
    with pytest.raises(ModelError, match="--negative-prompt: DigitsDiTPipeline takes no negative_prompt; leave it out"):
        StudySettings(negative_prompt="blurry").call_kwargs(embedded_pipe)


def test_prompts_of_a_class_conditional_model_become_class_ids(embedded_pipe):
    settings = StudySettings(prompts=("digit 3", "7"), samples=4)
    samples = settings.samples_for(embedded_pipe)
    assert [(s.condition, s.seed) for s in samples] == [(3, 0), (7, 0), (3, 1), (7, 1)]
    held = settings.samples_for(embedded_pipe, 4, split="held_out")
    assert [s.condition for s in held] == [3, 7, 3, 7] and min(s.seed for s in held) >= 1_000_000
    with pytest.raises(ModelError, match="prompts"):
        StudySettings(prompts=("a red fox",)).samples_for(embedded_pipe)


def test_default_samples_are_the_familys_own(embedded_pipe):
    samples = StudySettings(samples=12).samples_for(embedded_pipe)
    assert [s.condition for s in samples] == [*range(10), 0, 1] and {s.seed for s in samples} == {0, 1}


@pytest.mark.parametrize("field,value", [("samples", 1), ("height", 4), ("num_inference_steps", 0)])
def test_settings_refuse_bad_numbers(field, value):
    with pytest.raises(DifftuneError, match=field):
        StudySettings(**{field: value})


def test_merge_objectives_reads_names_and_directions():
    assert merge_objectives(["speedup, psnr:max", ("lpips", "min")]) == ["speedup", ("psnr", "max"), ("lpips", "min")]


def test_a_worker_on_another_kind_of_device_is_refused():
    cpu_study, cuda_study = StudySettings(device="cpu"), StudySettings(device="cuda:0")
    assert worker_device(cpu_study, None, "s") == "cpu"
    with pytest.raises(ModelError, match="measures on cpu; a worker on cuda:0 would time trials that do not compare"):
        worker_device(cpu_study, "cuda:0", "s")
    with pytest.raises(ModelError, match="measures on cuda"):
        worker_device(cuda_study, "cpu", "s")
    if NO_CUDA:
        with pytest.raises(ModelError, match="which this machine lacks"):
            worker_device(cuda_study, None, "s")
