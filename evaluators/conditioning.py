"""Conditioning agreement: does each image show what was asked for?

- ``class_accuracy`` (embedded model): the share of images the committed digit classifier assigns the
  requested label. Like FID it is a guard against the blur a PSNR-only search drifts to — a washed-out
  digit stops being recognizable long before its PSNR against the reference drops much.
- ``clip_score`` (text-to-image models): torchmetrics' CLIPScore, only when the CLIP weights are in the
  local Hugging Face cache; difftune never downloads them at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from difftune.errors import EvaluationError

from ._embedded import committed_classifier
from .metrics import BoundMetric, EvalBatch, MetricContext, register_metric_factory

__all__ = ["DEFAULT_CLIP_MODEL", "ClassAccuracy", "class_agreement", "clip_model_path"]

#: The CLIP checkpoint ``clip_score`` uses unless ``options={"clip_model": …}`` says otherwise.
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def class_agreement(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, whether the classifier's top class (``logits`` N×K) equals the requested label (N,)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise EvaluationError(
            f"class_accuracy: expected N×K logits and N labels, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return logits.argmax(1) == labels.to(logits.device)


class ClassAccuracy(Metric):
    """Share of images (N×1×16×16 in [0, 1]) that the digit classifier assigns their requested label.

    Example::

        >>> from difftune.models.embedded.data import load_split
        >>> images, labels = load_split("classifier")
        >>> acc = ClassAccuracy()
        >>> acc.update((images + 1) / 2, labels)
        >>> float(acc.compute()) > 0.97
        True
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, classifier: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classifier = (classifier if classifier is not None else committed_classifier()).eval()
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> None:
        labels_t = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        dtype = next(self.classifier.parameters()).dtype
        with torch.no_grad():
            logits = self.classifier(images.to(dtype) * 2 - 1)
        hits = class_agreement(logits, labels_t)
        self.correct += hits.sum()
        self.total += hits.numel()

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            raise EvaluationError("class_accuracy: compute() before any update(): no images were given")
        return self.correct.float() / self.total

    def train(self, mode: bool = True) -> ClassAccuracy:
        # The classifier has dropout: it must never leave eval mode.
        return super().train(False)


@register_metric_factory("class_accuracy")
def _build_class_accuracy(context: MetricContext) -> BoundMetric:
    """Embedded model only (option ``classifier_path`` for another digit classifier)."""
    if context.family != "embedded":
        raise EvaluationError(
            f"class_accuracy needs a classifier for the model's classes; difftune ships one for the embedded model "
            f"only, not for family {context.family!r}: use clip_score or fid instead"
        )
    path = context.options.get("classifier_path")
    metric = ClassAccuracy(committed_classifier(str(path) if path else None)).to(context.device)

    def feed(batch: EvalBatch) -> None:
        if not all(isinstance(c, int) for c in batch.conditions):
            raise EvaluationError("class_accuracy needs class labels (ints) as the samples' conditions")
        metric.update(batch.images, [int(c) for c in batch.conditions])

    return BoundMetric(metric, feed, needs_reference=False)


# ---- CLIP score ----------------------------------------------------------------------------------


def clip_model_path(model: str = DEFAULT_CLIP_MODEL) -> str | None:
    """The local directory of CLIP checkpoint ``model`` (a hub id already in the cache, or a directory), else None."""
    from pathlib import Path

    if Path(model).is_dir():
        return model
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached, offline, or an ill-formed id: all mean "not available locally"
        return None


def _local_clip_loader(path: str) -> Callable[[], tuple[Any, Any]]:
    def load() -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        return CLIPModel.from_pretrained(path, local_files_only=True), CLIPProcessor.from_pretrained(
            path, local_files_only=True
        )

    return load


@register_metric_factory("clip_score")
def _build_clip_score(context: MetricContext) -> BoundMetric:
    """Option ``clip_model``: a hub id in the local cache or a local directory (default :data:`DEFAULT_CLIP_MODEL`)."""
    model = str(context.options.get("clip_model", DEFAULT_CLIP_MODEL))
    path = clip_model_path(model)
    if path is None:
        raise EvaluationError(
            f"clip_score needs the CLIP weights {model!r} locally (difftune never downloads at run time); "
            f"fetch them once with `huggingface-cli download {model}` (or pass options={{'clip_model': DIR}} "
            "with a local CLIP checkpoint), or leave clip_score out of the metrics"
        )
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=_local_clip_loader(path)).to(context.device)

    def feed(batch: EvalBatch) -> None:
        prompts = [_prompt(c, context.family) for c in batch.conditions]
        # CLIP's processor rescales by 1/255: hand it images in [0, 255].
        metric.update(list(batch.images.float() * 255), prompts)

    return BoundMetric(metric, feed, needs_reference=False)


def _prompt(condition: int | str, family: str) -> str:
    if isinstance(condition, str):
        return condition
    if family == "embedded":
        return f"a handwritten digit {condition}"
    raise EvaluationError(f"clip_score needs text prompts; got class label {condition!r} for family {family!r}")
