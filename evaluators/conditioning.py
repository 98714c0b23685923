"""Conditioning agreement: does each image show what was asked for?

- ``class_accuracy`` (embedded model): the share of images the committed digit classifier assigns the
  requested label. Like FID it is a guard against the blur a PSNR-only search drifts to — a washed-out
  digit stops being recognizable long before its PSNR against the reference drops much.
- ``clip_score`` (text-to-image models): the CLIP score (:class:`CLIPScore`, torchmetrics' definition), only
  when the CLIP weights are in the local Hugging Face cache or a local directory; difftune never
  downloads them at run time.
- ``image_reward`` (text-to-image models): the ImageReward human-preference score, only when the
  ``image-reward`` package and the ``THUDM/ImageReward`` weights are installed; never downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from difftune.errors import EvaluationError

from ._embedded import committed_classifier
from .metrics import BoundMetric, EvalBatch, MetricContext, register_metric_factory

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "IMAGE_REWARD_REPO",
    "CLIPScore",
    "ClassAccuracy",
    "ImageRewardScore",
    "class_agreement",
    "clip_model_path",
    "clip_scores",
    "image_reward_unavailable_reason",
    "load_clip",
]

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
        # The committed classifier is one module per process, shared by every metric that uses it, so it
        # may sit on another device than this metric's state (a CUDA study before a CPU one): follow it.
        weight = next(self.classifier.parameters())
        with torch.no_grad():
            logits = self.classifier(images.to(device=weight.device, dtype=weight.dtype) * 2 - 1)
        hits = class_agreement(logits, labels_t)
        self.correct += hits.sum().to(self.correct.device)
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
            f"only, not for family {context.family!r}: use sharpness (needs no weights), clip_score or fid instead"
        )
    path = context.options.get("classifier_path")
    metric = ClassAccuracy(committed_classifier(str(path) if path else None)).to(context.device)

    def feed(batch: EvalBatch) -> None:
        if not all(isinstance(c, int) for c in batch.conditions):
            raise EvaluationError("class_accuracy needs class labels (ints) as the samples' conditions")
        metric.update(batch.images, [int(c) for c in batch.conditions])

    return BoundMetric(metric, feed, needs_reference=False)


# ---- CLIP score ----------------------------------------------------------------------------------


def _cached_snapshot(repo: str) -> str | None:
    # The local snapshot of a hub repository already in the Hugging Face cache; never a download.
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(repo, local_files_only=True))
    except Exception:  # not cached, offline, or an ill-formed id: all mean "not available locally"
        return None


def clip_model_path(model: str = DEFAULT_CLIP_MODEL) -> str | None:
    """The local directory of CLIP checkpoint ``model`` (a hub id already in the cache, or a directory), else None."""
    if Path(model).is_dir():
        return model
    return _cached_snapshot(model)


def load_clip(path: str | Path) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from the local directory ``path`` (``save_pretrained`` layout); no downloads."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:  # missing files, or not a CLIP checkpoint
        raise EvaluationError(f"clip_score: cannot load a CLIP model and processor from {path}: {exc}") from exc
    return model.eval(), processor


def clip_scores(model: Any, processor: Any, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Per image, ``100 · cos(CLIP image embedding, CLIP text embedding of its prompt)``: (N,), not clamped.

    ``images``: N×C×H×W in [0, 1] (grey is repeated to RGB). They are handed to the processor as 8-bit
    images, like saved PNGs: its PIL backend refuses floats outside [0, 1] and rescales by 1/255 itself.
    Prompts longer than the text tower's positions are truncated.
    """
    if images.dim() != 4 or len(images) != len(prompts):
        raise EvaluationError(
            f"clip_score: expected N×C×H×W images and N prompts, got {tuple(images.shape)} and {len(prompts)} prompts"
        )
    x = images.detach().float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    pixels = (x * 255).round().to(torch.uint8).cpu()
    max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))
    inputs = processor(
        text=list(prompts),
        images=list(pixels),
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_length,
    )
    parameter = next(model.parameters())
    with torch.no_grad():
        # CLIPModel's forward returns unit-norm projected embeddings in every transformers release, while
        # get_image_features / get_text_features changed their return type in transformers 5.
        out = model(
            input_ids=inputs["input_ids"].to(parameter.device),
            attention_mask=inputs["attention_mask"].to(parameter.device),
            pixel_values=inputs["pixel_values"].to(parameter.device, parameter.dtype),
        )
    return 100 * (out.image_embeds.float() * out.text_embeds.float()).sum(-1)


class CLIPScore(Metric):
    """CLIP score (Hessel et al. 2021): ``max(100 · cos(image embedding, prompt embedding), 0)`` per image,
    averaged over images — torchmetrics' documented definition, computed here because torchmetrics' own
    CLIPScore reads ``get_image_features``' output as a tensor, which transformers 5 no longer returns.

    Args:
        model: a ``transformers.CLIPModel``; processor: its ``CLIPProcessor`` (see :func:`load_clip`).

    ``update(images, prompts)``: N×C×H×W images in [0, 1] and N prompts.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    score_sum: torch.Tensor
    total: torch.Tensor

    def __init__(self, model: nn.Module, processor: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        scores = clip_scores(self.model, self.processor, images, prompts).clamp(min=0)
        self.score_sum += scores.double().sum().to(self.score_sum.device)
        self.total += scores.numel()

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            raise EvaluationError("clip_score: compute() before any update(): no images were given")
        return (self.score_sum / self.total).float()

    def train(self, mode: bool = True) -> CLIPScore:
        # A fixed scorer: never let a container switch its dropout on.
        return super().train(False)


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
    metric = CLIPScore(*load_clip(path)).to(context.device)

    def feed(batch: EvalBatch) -> None:
        metric.update(batch.images, [_prompt(c, context.family) for c in batch.conditions])

    return BoundMetric(metric, feed, needs_reference=False)


def _prompt(condition: int | str, family: str, metric: str = "clip_score") -> str:
    if isinstance(condition, str):
        return condition
    if family == "embedded":
        return f"a handwritten digit {condition}"
    raise EvaluationError(f"{metric} needs text prompts; got class label {condition!r} for family {family!r}")


# ---- ImageReward ---------------------------------------------------------------------------------

#: The Hugging Face repository of ImageReward's weights (``ImageReward.pt`` and ``med_config.json``).
IMAGE_REWARD_REPO = "THUDM/ImageReward"
_IMAGE_REWARD_FILES = ("ImageReward.pt", "med_config.json")
# BLIP, inside ImageReward, builds its tokenizer with BertTokenizer.from_pretrained("bert-base-uncased").
_BLIP_TOKENIZER = "bert-base-uncased"


def _image_reward_dir(location: str | None) -> Path | None:
    candidates: list[Path] = []
    if location:
        candidates.append(Path(location).expanduser())
    else:
        cached = _cached_snapshot(IMAGE_REWARD_REPO)
        if cached is not None:
            candidates.append(Path(cached))
        candidates.append(Path("~/.cache/ImageReward").expanduser())  # image-reward's own download folder
    for candidate in candidates:
        folder = candidate.parent if candidate.is_file() else candidate
        if all((folder / name).is_file() for name in _IMAGE_REWARD_FILES):
            return folder
    return None


def image_reward_unavailable_reason(location: str | None = None) -> str | None:
    """None when ``image_reward`` can run here without downloading, else everything that is missing and how to
    get it. ``location``: a directory with ``ImageReward.pt`` and ``med_config.json`` (default: the Hugging Face
    cache of :data:`IMAGE_REWARD_REPO`, then ``~/.cache/ImageReward``)."""
    import importlib.util

    missing: list[str] = []
    if importlib.util.find_spec("ImageReward") is None:
        missing.append("the image-reward package (pip install image-reward; it needs torchvision)")
    if _image_reward_dir(location) is None:
        where = f"in {location}" if location else f"in the Hugging Face cache or {Path('~/.cache/ImageReward')}"
        missing.append(
            f"the {IMAGE_REWARD_REPO} weights ({' and '.join(_IMAGE_REWARD_FILES)} {where}; fetch them once on a "
            f"machine with internet: hf download {IMAGE_REWARD_REPO}, or pass options={{'image_reward_model': DIR}})"
        )
    if _cached_snapshot(_BLIP_TOKENIZER) is None:
        missing.append(f"the {_BLIP_TOKENIZER} tokenizer its BLIP encoder loads (hf download {_BLIP_TOKENIZER})")
    if not missing:
        return None
    return "image_reward needs " + "; and ".join(missing) + " (difftune never downloads at run time)"


@contextmanager
def _hub_offline() -> Iterator[None]:
    # ImageReward.load always asks the hub for med_config.json and BLIP for its tokenizer: in offline mode
    # the hub client serves the local files instead of checking for (and fetching) newer ones.
    from huggingface_hub import constants

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


class ImageRewardScore(Metric):
    """Mean ImageReward score (Xu et al. 2023: a human-preference reward of an image for its prompt).

    ``model``: an ImageReward model (``ImageReward.load(path)``); ``update(images, prompts)`` takes N×C×H×W
    images in [0, 1] and N prompts, scored with the model's ``score(prompt, pil_images)``.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    score_sum: torch.Tensor
    total: torch.Tensor

    def __init__(self, model: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reward_model = model
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        from PIL import Image

        if images.dim() != 4 or len(images) != len(prompts):
            raise EvaluationError(
                f"image_reward: expected N×C×H×W images and N prompts, got {tuple(images.shape)} and {len(prompts)}"
            )
        x = images.detach().float().clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        arrays = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        by_prompt: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            by_prompt.setdefault(prompt, []).append(index)
        total = 0.0
        with torch.no_grad():
            for prompt, indices in by_prompt.items():
                rewards = self.reward_model.score(prompt, [Image.fromarray(arrays[i]) for i in indices])
                # score() squeezes its result: one image gives a float, several a list.
                values = [float(rewards)] if isinstance(rewards, (int, float)) else [float(r) for r in rewards]
                if len(values) != len(indices):
                    raise EvaluationError(f"image_reward: {len(values)} scores for {len(indices)} images")
                total += sum(values)
        self.score_sum += total
        self.total += len(prompts)

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            raise EvaluationError("image_reward: compute() before any update(): no images were given")
        return (self.score_sum / self.total).float()


@register_metric_factory("image_reward")
def _build_image_reward(context: MetricContext) -> BoundMetric:
    """Option ``image_reward_model``: a directory with ``ImageReward.pt`` and ``med_config.json`` (default: the
    Hugging Face cache of :data:`IMAGE_REWARD_REPO`, then ``~/.cache/ImageReward``)."""
    location = context.options.get("image_reward_model")
    reason = image_reward_unavailable_reason(str(location) if location else None)
    folder = _image_reward_dir(str(location) if location else None)
    if reason is not None or folder is None:
        raise EvaluationError(reason or "image_reward: its weights are not available here")
    import ImageReward  # type: ignore[import-not-found]

    with _hub_offline():
        model = ImageReward.load(str(folder / "ImageReward.pt"), device=str(context.device), download_root=str(folder))
    metric = ImageRewardScore(model.eval())

    def feed(batch: EvalBatch) -> None:
        metric.update(batch.images, [_prompt(c, context.family, "image_reward") for c in batch.conditions])

    return BoundMetric(metric, feed, needs_reference=False)
