"""load_pipeline: every kind of spec, and clear errors that never trigger a download."""

from __future__ import annotations

import pytest

import difftune
from difftune.models.embedded import DigitsDiTPipeline


def test_embedded_and_path_load_the_same_weights(embedded_pipe, tmp_path):
    embedded_pipe.save_pretrained(tmp_path / "copy")
    again = difftune.load_pipeline(str(tmp_path / "copy"))
    assert isinstance(again, DigitsDiTPipeline)
    assert difftune.describe(again).fingerprint == difftune.describe(embedded_pipe).fingerprint


def test_pipeline_object_is_returned_as_is(embedded_pipe):
    assert difftune.load_pipeline(embedded_pipe) is embedded_pipe


def test_directory_without_model_index(tmp_path):
    with pytest.raises(difftune.ModelError, match=r"model_index\.json"):
        difftune.load_pipeline(tmp_path)


def test_uncached_hub_id_is_never_downloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("load_pipeline tried to download")

    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "download", no_network)
    with pytest.raises(difftune.ModelError, match="hf download someone/some-model"):
        difftune.load_pipeline("someone/some-model")


def test_cached_hub_id_loads_offline(monkeypatch, tmp_path, embedded_pipe):
    """A hub id whose snapshot is in the local cache loads from there with local_files_only."""
    import diffusers

    calls = {}
    monkeypatch.setattr("difftune.models._load.is_available_locally", lambda repo: True)

    def fake_from_pretrained(name, **kwargs):
        calls.update(kwargs, name=name)
        return embedded_pipe

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", fake_from_pretrained)
    assert difftune.load_pipeline("org/model") is embedded_pipe
    assert calls == {"name": "org/model", "local_files_only": True}


@pytest.mark.parametrize("spec", ["./no/such/dir", "not a model", 42])
def test_unknown_specs(spec):
    with pytest.raises(difftune.ModelError):
        difftune.load_pipeline(spec)
