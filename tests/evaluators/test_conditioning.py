"""class_accuracy with the committed classifier; CLIP score refuses to download."""

from __future__ import annotations

import pytest
import torch

import difftune
from difftune.evaluators import ClassAccuracy, MetricContext, build_metric, class_agreement, clip_model_path


def test_class_accuracy_of_real_digits(real_digits):
    _, (images, labels) = real_digits
    acc = ClassAccuracy()
    acc.update(images[:400], labels[:400])
    acc.update(images[400:], labels[400:])
    assert float(acc.compute()) >= 0.97
    wrong = ClassAccuracy()
    wrong.update(images, (labels + 1) % 10)
    assert float(wrong.compute()) <= 0.05


def test_class_agreement_is_a_pure_function():
    logits = torch.tensor([[0.0, 2.0], [3.0, 1.0], [0.0, 1.0]])
    assert class_agreement(logits, torch.tensor([1, 1, 1])).tolist() == [True, False, True]
    with pytest.raises(difftune.EvaluationError, match="N×K"):
        class_agreement(logits, torch.tensor([1, 1]))


def test_class_accuracy_is_for_the_embedded_model_only():
    with pytest.raises(difftune.EvaluationError, match="embedded"):
        build_metric("class_accuracy", MetricContext(family="sd"))


@pytest.mark.skipif(clip_model_path() is not None, reason="CLIP weights are cached here")
def test_clip_score_without_local_weights_says_how_to_get_them():
    with pytest.raises(difftune.EvaluationError, match=r"never downloads.*huggingface-cli download"):
        build_metric("clip_score", MetricContext(family="sd"))
