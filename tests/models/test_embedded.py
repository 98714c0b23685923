"""The embedded default model: offline loading, the pipeline's interface, and sample quality."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch

import difftune
from difftune.models.embedded import DEFAULT_CLASSIFIER_DIR, DEFAULT_PIPELINE_DIR, classify, parse_label
from difftune.models.embedded.data import load_split


def test_weights_are_committed_in_the_diffusers_layout():
    index = json.loads((DEFAULT_PIPELINE_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "DigitsDiTPipeline"
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    weights = DEFAULT_PIPELINE_DIR / "transformer" / "diffusion_pytorch_model.safetensors"
    total = weights.stat().st_size + (DEFAULT_CLASSIFIER_DIR / "diffusion_pytorch_model.safetensors").stat().st_size
    assert total <= 20 * 2**20
    assert (DEFAULT_PIPELINE_DIR / "scheduler" / "scheduler_config.json").is_file()


@pytest.mark.parametrize("text,label", [("digit 3", 3), ("3", 3), ("Digit 0", 0), (" 9 ", 9), (7, 7)])
def test_parse_label_accepts_class_names(text, label):
    assert parse_label(text) == label


@pytest.mark.parametrize("bad", ["digit x", "cat", "10", "digit 12", 10, -1, ""])
def test_parse_label_rejects_other_text(bad):
    with pytest.raises(difftune.ModelError, match="embedded"):
        parse_label(bad)


def test_output_types_and_prompt_equals_class_labels(embedded_pipe):
    def run(**kw):
        return embedded_pipe(num_inference_steps=4, generator=torch.Generator().manual_seed(1), **kw).images

    pt = run(prompt=["digit 3", "7"], output_type="pt")
    assert pt.shape == (2, 1, 16, 16) and pt.min() >= 0 and pt.max() <= 1
    assert torch.equal(run(class_labels=[3, 7], output_type="pt"), pt)
    np_images = run(prompt=["3", "7"], output_type="np")
    assert np_images.shape == (2, 16, 16, 1)
    np.testing.assert_array_equal(np_images, pt.permute(0, 2, 3, 1).numpy())
    pil = run(prompt="digit 3", output_type="pil")
    assert len(pil) == 1 and pil[0].size == (16, 16)
    assert not torch.equal(run(class_labels=[3, 3], output_type="pt")[1], pt[1])


def test_bad_calls_raise_model_error(embedded_pipe):
    with pytest.raises(difftune.ModelError, match="exactly one"):
        embedded_pipe(prompt="3", class_labels=[3], num_inference_steps=2)
    with pytest.raises(difftune.ModelError, match="output_type"):
        embedded_pipe(prompt="3", num_inference_steps=2, output_type="latent")
    with pytest.raises(difftune.ModelError, match="16"):
        embedded_pipe(prompt="3", num_inference_steps=2, height=32)


def test_classifier_recognises_digits_it_never_saw(classifier):
    images, labels = load_split("generator")  # the classifier trained on the other split
    predicted = classify(classifier, images / 2 + 0.5)
    assert (predicted == labels).float().mean().item() >= 0.97


def test_data_splits_are_disjoint_and_stratified():
    from difftune.models.embedded.data import _load_digits, split_indices

    _, labels = _load_digits()
    gen, cls = split_indices(labels)
    assert not set(gen) & set(cls) and len(gen) + len(cls) == len(labels)
    for digit in range(10):
        share = np.mean(labels[gen] == digit) / np.mean(labels == digit)
        assert 0.9 < share < 1.1


def _accuracy(pipe, classifier, n_per_class: int, steps: int, seed: int = 0) -> float:
    labels = [d for d in range(10) for _ in range(n_per_class)]
    images = pipe(
        class_labels=labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt"
    ).images
    return (classify(classifier, images) == torch.tensor(labels)).float().mean().item()


def test_samples_at_50_steps_are_recognised(embedded_pipe, classifier):
    """The headline quality figure: >= 90 % of 200 samples at 50 steps classified as the requested digit."""
    assert _accuracy(embedded_pipe, classifier, n_per_class=20, steps=50) >= 0.90


@pytest.mark.parametrize(
    "scheduler", ["DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler"]
)
def test_standard_schedulers_draw_clean_digits_with_their_usual_settings(embedded_pipe, classifier, scheduler):
    original = embedded_pipe.scheduler
    embedded_pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
    try:
        assert _accuracy(embedded_pipe, classifier, n_per_class=5, steps=20, seed=3) >= 0.85
    finally:
        embedded_pipe.scheduler = original


def test_noise_schedule_keeps_data_prediction_finite_at_t999(embedded_pipe):
    """Why not a cosine schedule: at t=999 its alpha is ~0, so x0 = (x - sigma*eps)/alpha amplifies the
    model's error by >1000× and DPM-Solver++/UniPC with 'linspace' spacing return noise. Ours stays bounded."""
    ours = diffusers.DDPMScheduler.from_config(embedded_pipe.scheduler.config).alphas_cumprod[-1].sqrt()
    cosine = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod[-1].sqrt()
    assert 1 / ours < 200 < 1000 < 1 / cosine
    # and the sampler still starts from (almost) pure noise: terminal SNR below 1e-4
    assert ours**2 / (1 - ours**2) < 1e-4
